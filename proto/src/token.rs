//! Network tokens: stateless HMAC over network name and expiry, minted by `meshpunch-rendezvous token create`.
