//! The connect string a rendezvous prints in `--dev` and a client accepts as-is: address, certificate SHA-256 pin and network token in one line.
