//! The rendezvous session as two sans-IO state machines: [`ServerSession`] and
//! [`ClientSession`]. The rendezvous server, the client library and the load generator drive
//! these; none of them writes the handshake itself.
//!
//! ```text
//! client                                   server
//!   Hello{token, key}            ──►  token checked (MAC, expiry, revocation, member key)
//!                                ◄──  Challenge{server_ephemeral, nonce}
//!   KeyProof{mac}                ──►  proof checked (see wire::key_proof)
//!                                ◄──  Registered{…}            (built by the driver)
//!        … every reauth_interval, on the live connection …
//!                                ◄──  Challenge{fresh ephemeral, fresh nonce}
//!   KeyProof{mac}                ──►  checked within REAUTH_TIMEOUT, else closed
//!        … at token expiry / on revocation …
//!                                ◄──  Error{Unauthorized, reason: expired | revoked}; close
//! ```
//!
//! Each proof is bound to the TLS exporter of the connection and to the nonce of the one
//! outstanding challenge, so a proof recorded on another connection or for an earlier
//! challenge is refused. Time is an argument (`now`); randomness (ephemeral keys, nonces)
//! comes from the rng the driver passes in, so tests are deterministic.
//!
//! Call order, like quinn-proto: feed input (`handle_message`, `handle_timeout`, `recheck`),
//! then drain `poll_transmit` and `poll_event`, then arm the timer `poll_timeout` returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::token::{Token, TokenError};
use crate::wire::{
    self, Challenge, ErrorCode, ErrorMsg, ErrorReason, Hello, KeyProof, Message, PeerKey,
    Registered,
};

/// How long a client has to answer a re-authentication challenge.
pub const REAUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// Default interval between re-authentication challenges on a live connection.
pub const DEFAULT_REAUTH_INTERVAL: Duration = Duration::from_secs(600);

/// Judges a token: MAC, expiry at `now_unix`, revocation. Implemented by the server over its
/// secret and revocation list.
pub trait TokenCheck {
    /// The verified token, or why it is refused.
    fn check(&self, token: &str, now_unix: u64) -> Result<Token, TokenError>;
}

/// The typed reason for a token refusal.
pub fn token_reason(e: &TokenError) -> ErrorReason {
    match e {
        TokenError::Expired(_) => ErrorReason::TokenExpired,
        TokenError::Revoked => ErrorReason::TokenRevoked,
        TokenError::KeyNotAllowed => ErrorReason::KeyNotAllowed,
        _ => ErrorReason::BadToken,
    }
}

/// Timers of a [`ServerSession`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSessionConfig {
    /// Hello and key proof must arrive within this time of the connection's start.
    pub handshake_timeout: Duration,
    /// Interval between re-authentication challenges.
    pub reauth_interval: Duration,
    /// Time to answer one re-authentication challenge.
    pub reauth_timeout: Duration,
}

impl Default for ServerSessionConfig {
    fn default() -> Self {
        ServerSessionConfig {
            handshake_timeout: Duration::from_secs(10),
            reauth_interval: DEFAULT_REAUTH_INTERVAL,
            reauth_timeout: REAUTH_TIMEOUT,
        }
    }
}

/// What a [`ServerSession`] reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// Token and key proof check out: register `key` in `network`, then send `Registered`.
    Registered {
        /// Network of the token.
        network: String,
        /// The proven WireGuard key.
        key: PeerKey,
        /// The token (for revocation checks by the driver).
        token: String,
        /// Unix time the token expires.
        expires_unix: u64,
    },
    /// A re-authentication challenge was answered correctly.
    Reauthenticated,
    /// The session is over: send what `poll_transmit` still returns, then close.
    Closed {
        /// Code of the final error sent.
        code: ErrorCode,
        /// Its typed reason, if any.
        reason: Option<ErrorReason>,
    },
}

/// An outstanding challenge: the ephemeral secret and nonce the proof must match.
struct Pending {
    eph: StaticSecret,
    eph_pub: [u8; 32],
    nonce: [u8; 32],
    deadline: Instant,
}

enum ServerState {
    AwaitHello,
    AwaitProof {
        hello: Hello,
        token: Token,
        pending: Pending,
    },
    Registered {
        key: PeerKey,
        token: String,
        expires_unix: u64,
        /// When the token expires on the monotonic clock (`None`: beyond any `Instant`).
        expires_at: Option<Instant>,
        next_reauth: Instant,
        pending: Option<Pending>,
    },
    Closed,
}

/// Server side of one rendezvous connection.
pub struct ServerSession {
    cfg: ServerSessionConfig,
    exporter: [u8; wire::EXPORTER_LEN],
    start: Instant,
    start_unix: u64,
    state: ServerState,
    out: VecDeque<Message>,
    events: VecDeque<ServerEvent>,
}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            ServerState::AwaitHello => "await_hello",
            ServerState::AwaitProof { .. } => "await_proof",
            ServerState::Registered { .. } => "registered",
            ServerState::Closed => "closed",
        };
        f.debug_struct("ServerSession")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

fn challenge(rng: &mut (impl RngCore + CryptoRng), deadline: Instant) -> (Pending, Message) {
    let eph = StaticSecret::random_from_rng(&mut *rng);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let mut nonce = [0u8; 32];
    rng.fill_bytes(&mut nonce);
    let msg = Message::Challenge(Challenge {
        server_ephemeral: eph_pub,
        nonce,
    });
    (
        Pending {
            eph,
            eph_pub,
            nonce,
            deadline,
        },
        msg,
    )
}

fn proof_ok(
    p: &Pending,
    exporter: &[u8; wire::EXPORTER_LEN],
    key: &PeerKey,
    proof: &KeyProof,
) -> bool {
    let dh = p.eph.diffie_hellman(&PublicKey::from(*key.as_bytes()));
    wire::verify_key_proof(
        dh.as_bytes(),
        exporter,
        &p.nonce,
        key,
        &p.eph_pub,
        &proof.mac,
    )
}

impl ServerSession {
    /// A session on a connection that started at `now` (`now_unix` on the wall clock) whose
    /// TLS exporter ([`wire::EXPORTER_LABEL`], empty context) is `exporter`.
    pub fn new(
        now: Instant,
        now_unix: u64,
        exporter: [u8; wire::EXPORTER_LEN],
        cfg: ServerSessionConfig,
    ) -> Self {
        ServerSession {
            cfg,
            exporter,
            start: now,
            start_unix: now_unix,
            state: ServerState::AwaitHello,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    fn unix(&self, now: Instant) -> u64 {
        self.start_unix
            .saturating_add(now.saturating_duration_since(self.start).as_secs())
    }

    fn close(&mut self, code: ErrorCode, reason: Option<ErrorReason>, message: String) {
        self.out.push_back(Message::Error(ErrorMsg {
            code,
            id: 0,
            message,
            reason,
        }));
        self.events.push_back(ServerEvent::Closed { code, reason });
        self.state = ServerState::Closed;
    }

    fn refuse(&mut self, reason: ErrorReason, message: String) {
        self.close(ErrorCode::Unauthorized, Some(reason), message);
    }

    /// Whether the key proof has been accepted and the session not closed.
    pub fn is_registered(&self) -> bool {
        matches!(self.state, ServerState::Registered { .. })
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, ServerState::Closed)
    }

    /// Unix time the registered token expires.
    pub fn expires_unix(&self) -> Option<u64> {
        match &self.state {
            ServerState::Registered { expires_unix, .. } => Some(*expires_unix),
            _ => None,
        }
    }

    /// Handles a message from the client. Session messages (Hello, KeyProof) are consumed;
    /// any other message of a registered session is handed back for the driver. Before
    /// registration anything else gets a `BadRequest` error (the connection stays open until
    /// the handshake deadline).
    pub fn handle_message(
        &mut self,
        now: Instant,
        msg: Message,
        tokens: &dyn TokenCheck,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Option<Message> {
        let now_unix = self.unix(now);
        match (std::mem::replace(&mut self.state, ServerState::Closed), msg) {
            (ServerState::AwaitHello, Message::Hello(hello)) => {
                let verified = tokens.check(&hello.token, now_unix).and_then(|t| {
                    match t.admits(hello.key.as_bytes()) {
                        true => Ok(t),
                        false => Err(TokenError::KeyNotAllowed),
                    }
                });
                match verified {
                    Ok(token) => {
                        let (pending, msg) =
                            challenge(rng, self.start + self.cfg.handshake_timeout);
                        self.out.push_back(msg);
                        self.state = ServerState::AwaitProof {
                            hello,
                            token,
                            pending,
                        };
                    }
                    Err(e) => self.refuse(token_reason(&e), e.to_string()),
                }
                None
            }
            (
                ServerState::AwaitProof {
                    hello,
                    token,
                    pending,
                },
                Message::KeyProof(proof),
            ) => {
                if !proof_ok(&pending, &self.exporter, &hello.key, &proof) {
                    self.refuse(ErrorReason::BadProof, "key proof failed".into());
                    return None;
                }
                // Valid through its expiry second: closed when the next second starts.
                let left = token
                    .expires_unix
                    .saturating_add(1)
                    .saturating_sub(now_unix);
                self.state = ServerState::Registered {
                    key: hello.key,
                    token: hello.token.clone(),
                    expires_unix: token.expires_unix,
                    expires_at: now.checked_add(Duration::from_secs(left)),
                    next_reauth: now + self.cfg.reauth_interval,
                    pending: None,
                };
                self.events.push_back(ServerEvent::Registered {
                    network: token.network,
                    key: hello.key,
                    token: hello.token,
                    expires_unix: token.expires_unix,
                });
                None
            }
            (
                ServerState::Registered {
                    key,
                    token,
                    expires_unix,
                    expires_at,
                    next_reauth,
                    pending,
                },
                msg,
            ) => {
                let registered = |pending| ServerState::Registered {
                    key,
                    token,
                    expires_unix,
                    expires_at,
                    next_reauth,
                    pending,
                };
                match msg {
                    Message::KeyProof(proof) => match pending {
                        Some(p) if proof_ok(&p, &self.exporter, &key, &proof) => {
                            self.state = registered(None);
                            self.events.push_back(ServerEvent::Reauthenticated);
                        }
                        // A proof for no outstanding challenge, or for another challenge or
                        // connection: refused, and the session ends.
                        _ => self.refuse(
                            ErrorReason::BadProof,
                            "re-authentication proof failed".into(),
                        ),
                    },
                    Message::Hello(_) => {
                        self.state = registered(pending);
                        self.out.push_back(Message::error(
                            ErrorCode::BadRequest,
                            0,
                            "unexpected hello after registration",
                        ));
                    }
                    other => {
                        self.state = registered(pending);
                        return Some(other);
                    }
                }
                None
            }
            (ServerState::Closed, _) => None,
            (state, msg) => {
                self.state = state;
                self.out.push_back(Message::error(
                    ErrorCode::BadRequest,
                    0,
                    format!("unexpected {} in this state", msg.name()),
                ));
                None
            }
        }
    }

    /// Re-checks the registered token (expiry, revocation) now, e.g. after the revocation
    /// list changed. Closes the session if it no longer verifies.
    pub fn recheck(&mut self, now: Instant, tokens: &dyn TokenCheck) {
        let now_unix = self.unix(now);
        if let ServerState::Registered { token, .. } = &self.state {
            if let Err(e) = tokens.check(token, now_unix) {
                self.refuse(token_reason(&e), e.to_string());
            }
        }
    }

    /// Handles the timer: handshake deadline, token expiry, re-authentication (a fresh
    /// challenge after `reauth_interval`, and its deadline).
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        tokens: &dyn TokenCheck,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let now_unix = self.unix(now);
        match &mut self.state {
            ServerState::AwaitHello | ServerState::AwaitProof { .. } => {
                if now >= self.start + self.cfg.handshake_timeout {
                    self.close(
                        ErrorCode::Timeout,
                        None,
                        "registration not completed in time".into(),
                    );
                }
            }
            ServerState::Registered {
                token,
                expires_unix,
                expires_at,
                next_reauth,
                pending,
                ..
            } => {
                if expires_at.is_some_and(|at| now >= at) || *expires_unix < now_unix {
                    let msg = format!("token expired at unix time {expires_unix}");
                    self.refuse(ErrorReason::TokenExpired, msg);
                    return;
                }
                if pending.as_ref().is_some_and(|p| now >= p.deadline) {
                    self.refuse(
                        ErrorReason::ReauthTimeout,
                        "re-authentication challenge not answered in time".into(),
                    );
                    return;
                }
                if pending.is_none() && now >= *next_reauth {
                    if let Err(e) = tokens.check(token, now_unix) {
                        self.refuse(token_reason(&e), e.to_string());
                        return;
                    }
                    *next_reauth = now + self.cfg.reauth_interval;
                    let (p, msg) = challenge(rng, now + self.cfg.reauth_timeout);
                    *pending = Some(p);
                    self.out.push_back(msg);
                }
            }
            ServerState::Closed => {}
        }
    }

    /// When [`ServerSession::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            ServerState::AwaitHello | ServerState::AwaitProof { .. } => {
                Some(self.start + self.cfg.handshake_timeout)
            }
            ServerState::Registered {
                expires_at,
                next_reauth,
                pending,
                ..
            } => {
                let reauth = match pending {
                    Some(p) => p.deadline,
                    None => *next_reauth,
                };
                Some(expires_at.map_or(reauth, |e| e.min(reauth)))
            }
            ServerState::Closed => None,
        }
    }

    /// Next message to send to the client.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }
}

/// What a [`ClientSession`] reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Registration done.
    Registered(Registered),
    /// A re-authentication challenge was answered (the proof is queued).
    ReauthAnswered,
    /// The server refused or ended the session with this error (`Unauthorized` with a typed
    /// reason: expired, revoked, bad token, …). The session is over.
    Refused(ErrorMsg),
    /// The server sent something the handshake did not expect. The session is over.
    Protocol(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    AwaitChallenge,
    AwaitRegistered,
    Registered,
    Closed,
}

/// Client side of one rendezvous connection.
pub struct ClientSession {
    secret: StaticSecret,
    key: PeerKey,
    exporter: [u8; wire::EXPORTER_LEN],
    state: ClientState,
    out: VecDeque<Message>,
    events: VecDeque<ClientEvent>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("key", &self.key)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// Starts a session on a connection whose TLS exporter is `exporter`: queues the Hello.
    pub fn new(
        token: String,
        secret: StaticSecret,
        software: String,
        exporter: [u8; wire::EXPORTER_LEN],
    ) -> Self {
        let key = PeerKey::from(PublicKey::from(&secret));
        let mut out = VecDeque::new();
        out.push_back(Message::Hello(Hello {
            token,
            key,
            software,
        }));
        ClientSession {
            secret,
            key,
            exporter,
            state: ClientState::AwaitChallenge,
            out,
            events: VecDeque::new(),
        }
    }

    /// Our public key.
    pub fn key(&self) -> PeerKey {
        self.key
    }

    /// Whether registration completed and the session has not ended.
    pub fn is_registered(&self) -> bool {
        self.state == ClientState::Registered
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == ClientState::Closed
    }

    fn answer(&mut self, c: &Challenge) {
        let dh = self
            .secret
            .diffie_hellman(&PublicKey::from(c.server_ephemeral));
        let mac = wire::key_proof(
            dh.as_bytes(),
            &self.exporter,
            &c.nonce,
            &self.key,
            &c.server_ephemeral,
        );
        self.out.push_back(Message::KeyProof(KeyProof { mac }));
    }

    /// Handles a message from the server. Session messages (Challenge, Registered, a
    /// session-ending Unauthorized) are consumed; every other message of a registered session
    /// is handed back for the driver.
    pub fn handle_message(&mut self, msg: Message) -> Option<Message> {
        match (self.state, msg) {
            (ClientState::Closed, _) => None,
            (ClientState::AwaitChallenge, Message::Challenge(c)) => {
                self.answer(&c);
                self.state = ClientState::AwaitRegistered;
                None
            }
            (ClientState::AwaitRegistered, Message::Registered(r)) => {
                self.state = ClientState::Registered;
                self.events.push_back(ClientEvent::Registered(r));
                None
            }
            (ClientState::Registered, Message::Challenge(c)) => {
                self.answer(&c);
                self.events.push_back(ClientEvent::ReauthAnswered);
                None
            }
            // An error that answers no request ends the session when it is Unauthorized
            // (expiry, revocation, failed re-authentication) or arrives during the handshake.
            (state, Message::Error(e))
                if e.id == 0
                    && (state != ClientState::Registered || e.code == ErrorCode::Unauthorized) =>
            {
                self.state = ClientState::Closed;
                self.events.push_back(ClientEvent::Refused(e));
                None
            }
            (ClientState::Registered, other) => Some(other),
            (_, other) => {
                self.state = ClientState::Closed;
                self.events.push_back(ClientEvent::Protocol(format!(
                    "unexpected {}",
                    other.name()
                )));
                None
            }
        }
    }

    /// Next message to send to the server.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{self, Revocations};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::cell::RefCell;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const T0: u64 = 1_000_000;

    struct Tokens(RefCell<Revocations>);

    impl TokenCheck for Tokens {
        fn check(&self, token: &str, now_unix: u64) -> Result<Token, TokenError> {
            token::verify(SECRET, token, now_unix, |t| self.0.borrow().contains(t))
        }
    }

    fn tokens() -> Tokens {
        Tokens(RefCell::new(Revocations::default()))
    }

    fn registered_msg() -> Message {
        Message::Registered(Registered {
            observed: "192.0.2.1:1".parse().unwrap(),
            network: "net".into(),
            relays: vec![],
            stun: vec![],
            server_time_unix_ms: 0,
        })
    }

    struct Pair {
        server: ServerSession,
        client: ClientSession,
        rng: StdRng,
        now: Instant,
        start: Instant,
    }

    impl Pair {
        fn new(token: String, exporter: [u8; 32], cfg: ServerSessionConfig) -> Pair {
            let mut rng = StdRng::seed_from_u64(7);
            let secret = StaticSecret::random_from_rng(&mut rng);
            let now = Instant::now();
            Pair {
                server: ServerSession::new(now, T0, exporter, cfg),
                client: ClientSession::new(token, secret, "test".into(), exporter),
                rng,
                now,
                start: now,
            }
        }

        /// Moves every queued message both ways until nothing moves; the server driver's
        /// part: send `Registered` on `ServerEvent::Registered`.
        fn pump(&mut self, t: &Tokens) -> Vec<ServerEvent> {
            let mut events = Vec::new();
            for _ in 0..16 {
                let mut moved = false;
                while let Some(m) = self.client.poll_transmit() {
                    moved = true;
                    let _ = self.server.handle_message(self.now, m, t, &mut self.rng);
                }
                while let Some(ev) = self.server.poll_event() {
                    if matches!(ev, ServerEvent::Registered { .. }) {
                        self.client.handle_message(registered_msg());
                    }
                    events.push(ev);
                }
                while let Some(m) = self.server.poll_transmit() {
                    moved = true;
                    let _ = self.client.handle_message(m);
                }
                if !moved {
                    break;
                }
            }
            events
        }

        fn advance_to(&mut self, at: Instant, t: &Tokens) {
            self.now = at;
            self.server.handle_timeout(self.now, t, &mut self.rng);
        }

        /// Runs timers up to `until`, pumping after each, jumping from wake-up to wake-up.
        fn run_until(&mut self, until: Instant, t: &Tokens) -> Vec<ServerEvent> {
            let mut events = self.pump(t);
            while let Some(at) = self.server.poll_timeout() {
                if at > until {
                    break;
                }
                self.advance_to(at, t);
                events.extend(self.pump(t));
            }
            events
        }
    }

    fn cfg() -> ServerSessionConfig {
        ServerSessionConfig {
            handshake_timeout: Duration::from_secs(10),
            reauth_interval: Duration::from_secs(600),
            reauth_timeout: REAUTH_TIMEOUT,
        }
    }

    fn refused(c: &mut ClientSession) -> Option<ErrorReason> {
        while let Some(ev) = c.poll_event() {
            if let ClientEvent::Refused(e) = ev {
                return e.reason;
            }
        }
        None
    }

    #[test]
    fn handshake_registers_and_reauth_keeps_the_session_alive() {
        let t = tokens();
        let tok = token::mint(SECRET, "net", T0 + 100_000).unwrap();
        let mut p = Pair::new(tok, [1; 32], cfg());
        let events = p.pump(&t);
        assert!(matches!(&events[0], ServerEvent::Registered { network, .. } if network == "net"));
        assert!(p.client.is_registered());
        // Three re-authentications over 30 minutes, each answered.
        let until = p.start + Duration::from_secs(1800);
        let events = p.run_until(until, &t);
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == ServerEvent::Reauthenticated)
                .count(),
            3
        );
        assert!(p.server.is_registered() && p.client.is_registered());
    }

    #[test]
    fn token_expiry_closes_the_live_session_with_a_typed_reason() {
        let t = tokens();
        let tok = token::mint(SECRET, "net", T0 + 3).unwrap();
        let mut p = Pair::new(tok, [1; 32], cfg());
        p.pump(&t);
        assert!(p.server.is_registered());
        let events = p.run_until(p.start + Duration::from_secs(5), &t);
        assert!(events.contains(&ServerEvent::Closed {
            code: ErrorCode::Unauthorized,
            reason: Some(ErrorReason::TokenExpired)
        }));
        // Closed at the start of the first second after the expiry second.
        assert_eq!(p.now, p.start + Duration::from_secs(4));
        assert_eq!(refused(&mut p.client), Some(ErrorReason::TokenExpired));
        assert!(p.client.is_closed());
    }

    #[test]
    fn a_client_that_ignores_the_challenge_is_closed_after_the_timeout() {
        let t = tokens();
        let tok = token::mint(SECRET, "net", T0 + 100_000).unwrap();
        let mut p = Pair::new(tok, [1; 32], cfg());
        p.pump(&t);
        let at = p.server.poll_timeout().unwrap();
        assert_eq!(at, p.start + Duration::from_secs(600));
        p.advance_to(at, &t);
        assert!(matches!(
            p.server.poll_transmit(),
            Some(Message::Challenge(_))
        ));
        // The challenge is dropped: nothing answers.
        let deadline = p.server.poll_timeout().unwrap();
        assert_eq!(deadline, at + REAUTH_TIMEOUT);
        p.advance_to(deadline - Duration::from_millis(1), &t);
        assert!(p.server.is_registered());
        p.advance_to(deadline, &t);
        match p.server.poll_transmit() {
            Some(Message::Error(e)) => assert_eq!(e.reason, Some(ErrorReason::ReauthTimeout)),
            other => panic!("{other:?}"),
        }
        assert!(p.server.is_closed());
    }

    #[test]
    fn a_proof_from_an_older_challenge_or_connection_is_refused() {
        let t = tokens();
        let tok = token::mint(SECRET, "net", T0 + 100_000).unwrap();
        let mut p = Pair::new(tok.clone(), [1; 32], cfg());
        p.pump(&t);
        // First re-authentication, answered; keep its proof.
        p.advance_to(p.start + Duration::from_secs(600), &t);
        let Some(Message::Challenge(c1)) = p.server.poll_transmit() else {
            panic!("no challenge")
        };
        p.client.handle_message(Message::Challenge(c1));
        let Some(old_proof) = p.client.poll_transmit() else {
            panic!("no proof")
        };
        let _ = p
            .server
            .handle_message(p.now, old_proof.clone(), &t, &mut p.rng);
        assert_eq!(p.server.poll_event(), Some(ServerEvent::Reauthenticated));
        // Second challenge: replaying the first proof fails (other nonce, other ephemeral).
        p.advance_to(p.start + Duration::from_secs(1200), &t);
        assert!(matches!(
            p.server.poll_transmit(),
            Some(Message::Challenge(_))
        ));
        let _ = p.server.handle_message(p.now, old_proof, &t, &mut p.rng);
        assert_eq!(
            p.server.poll_event(),
            Some(ServerEvent::Closed {
                code: ErrorCode::Unauthorized,
                reason: Some(ErrorReason::BadProof)
            })
        );

        // A proof computed on another connection (other TLS exporter) for this very
        // challenge fails too.
        let mut a = Pair::new(tok.clone(), [1; 32], cfg());
        a.pump(&t);
        a.advance_to(a.start + Duration::from_secs(600), &t);
        let Some(Message::Challenge(c)) = a.server.poll_transmit() else {
            panic!("no challenge")
        };
        let mut rng = StdRng::seed_from_u64(7);
        let same_key = StaticSecret::random_from_rng(&mut rng);
        let mut other_conn = ClientSession::new(tok, same_key, "x".into(), [2; 32]);
        other_conn.state = ClientState::Registered;
        other_conn.handle_message(Message::Challenge(c));
        let _ = other_conn.poll_transmit(); // the Hello
        let proof = other_conn.poll_transmit().unwrap();
        let _ = a.server.handle_message(a.now, proof, &t, &mut a.rng);
        assert_eq!(
            a.server.poll_event(),
            Some(ServerEvent::Closed {
                code: ErrorCode::Unauthorized,
                reason: Some(ErrorReason::BadProof)
            })
        );
        // An unsolicited proof (no challenge outstanding) is refused as well.
        let mut b = Pair::new(
            token::mint(SECRET, "net", T0 + 100_000).unwrap(),
            [1; 32],
            cfg(),
        );
        b.pump(&t);
        let _ = b.server.handle_message(
            b.now,
            Message::KeyProof(KeyProof { mac: [0; 32] }),
            &t,
            &mut b.rng,
        );
        assert!(b.server.is_closed());
    }

    #[test]
    fn revocation_is_seen_on_recheck_and_at_reauth() {
        let t = tokens();
        let tok = token::mint(SECRET, "net", T0 + 100_000).unwrap();
        let mut p = Pair::new(tok.clone(), [1; 32], cfg());
        p.pump(&t);
        p.server.recheck(p.now, &t);
        assert!(p.server.is_registered());
        *t.0.borrow_mut() = Revocations::parse([tok.as_str()]).unwrap();
        p.server.recheck(p.now, &t);
        p.pump(&t);
        assert_eq!(refused(&mut p.client), Some(ErrorReason::TokenRevoked));

        // Without a recheck, the next re-authentication finds it.
        let mut q = Pair::new(tok, [1; 32], cfg());
        *t.0.borrow_mut() = Revocations::default();
        q.pump(&t);
        *t.0.borrow_mut() = Revocations::parse([tok_of(&q)].iter().map(String::as_str)).unwrap();
        let events = q.run_until(q.start + Duration::from_secs(601), &t);
        assert!(events.contains(&ServerEvent::Closed {
            code: ErrorCode::Unauthorized,
            reason: Some(ErrorReason::TokenRevoked)
        }));
    }

    fn tok_of(p: &Pair) -> String {
        match &p.server.state {
            ServerState::Registered { token, .. } => token.clone(),
            _ => panic!("not registered"),
        }
    }

    #[test]
    fn refusals_at_hello_carry_their_reason() {
        let t = tokens();
        let key_bytes = {
            let mut rng = StdRng::seed_from_u64(7);
            PublicKey::from(&StaticSecret::random_from_rng(&mut rng)).to_bytes()
        };
        let cases = [
            (
                token::mint(SECRET, "net", T0 - 1).unwrap(),
                ErrorReason::TokenExpired,
            ),
            (
                token::mint(b"another secret of 32 bytes......", "net", T0 + 9).unwrap(),
                ErrorReason::BadToken,
            ),
            (
                token::mint_for(SECRET, "net", T0 + 9, Some([9; 32])).unwrap(),
                ErrorReason::KeyNotAllowed,
            ),
        ];
        for (tok, reason) in cases {
            let mut p = Pair::new(tok, [1; 32], cfg());
            p.pump(&t);
            assert!(p.server.is_closed());
            assert_eq!(refused(&mut p.client), Some(reason));
        }
        // The member token of this very key is admitted.
        let mut p = Pair::new(
            token::mint_for(SECRET, "net", T0 + 9, Some(key_bytes)).unwrap(),
            [1; 32],
            cfg(),
        );
        p.pump(&t);
        assert!(p.server.is_registered());
    }

    #[test]
    fn a_silent_client_is_closed_at_the_handshake_deadline() {
        let t = tokens();
        let now = Instant::now();
        let mut s = ServerSession::new(now, T0, [0; 32], cfg());
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
        s.handle_timeout(now + Duration::from_secs(10), &t, &mut rng);
        assert_eq!(
            s.poll_event(),
            Some(ServerEvent::Closed {
                code: ErrorCode::Timeout,
                reason: None
            })
        );
        // Messages out of order before registration get BadRequest, not a crash.
        let mut s = ServerSession::new(now, T0, [0; 32], cfg());
        let _ = s.handle_message(now, Message::Watch(vec![]), &t, &mut rng);
        assert!(
            matches!(s.poll_transmit(), Some(Message::Error(e)) if e.code == ErrorCode::BadRequest)
        );
        assert!(!s.is_closed());
    }

    #[test]
    fn registered_traffic_is_handed_back_to_the_drivers() {
        let t = tokens();
        let tok = token::mint(SECRET, "net", T0 + 100_000).unwrap();
        let mut p = Pair::new(tok, [1; 32], cfg());
        p.pump(&t);
        let watch = Message::Watch(vec![]);
        assert_eq!(
            p.server
                .handle_message(p.now, watch.clone(), &t, &mut p.rng),
            Some(watch)
        );
        let presence = Message::Presence {
            key: PeerKey([1; 32]),
            online: true,
        };
        assert_eq!(p.client.handle_message(presence.clone()), Some(presence));
        // An offer error (id != 0) is traffic, not the end of the session.
        let err = Message::error(ErrorCode::NotFound, 5, "peer not found");
        assert_eq!(p.client.handle_message(err.clone()), Some(err));
        assert!(p.client.is_registered());
    }
}
