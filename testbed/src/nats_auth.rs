//! NATS credentials made in the test: nkey users, and a decentralized-auth set (an operator, an
//! account with JetStream, a user) with the server configuration that trusts it and the creds file
//! `nsc` would write for the user.
//!
//! A NATS JWT is `base64url(header).base64url(claims).base64url(signature)` (no padding), signed
//! with the issuer's ed25519 nkey (`"alg": "ed25519-nkey"`); operators sign accounts, accounts sign
//! users. The claims here are the fields nats-server reads (ADR-5 / `nats-io/jwt` v2); `-1` means
//! "no limit", and the account's `mem_storage`/`disk_storage`/`streams`/`consumer` limits enable
//! JetStream for it.

use anyhow::{anyhow, Result};
use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use serde_json::{json, Value};

/// An nkey user: what the client keeps (`seed`, `SU…`) and what the server lists (`public_key`).
pub struct NkeyUser {
    pub seed: String,
    pub public_key: String,
}

impl NkeyUser {
    pub fn new() -> Result<Self> {
        let user = KeyPair::new_user();
        Ok(Self {
            seed: user.seed().map_err(|e| anyhow!("nkey seed: {e}"))?,
            public_key: user.public_key(),
        })
    }
}

/// A nats-server configuration that admits exactly `users` (by their public nkeys).
pub fn nkey_server_config(users: &[&NkeyUser]) -> String {
    let users: Vec<String> = users
        .iter()
        .map(|u| format!("{{ nkey: \"{}\" }}", u.public_key))
        .collect();
    format!("authorization {{\n  users = [ {} ]\n}}\n", users.join(", "))
}

/// An operator, one account with JetStream enabled and one user of it.
pub struct Operator {
    /// The nats-server configuration lines: the operator JWT, a memory resolver preloaded with
    /// the account JWTs, the system account.
    pub server_config: String,
    /// The user's creds file (its JWT and seed), as `nsc generate creds` writes it.
    pub creds: String,
}

impl Operator {
    pub fn new(name: &str) -> Result<Self> {
        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            name,
            json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
        )?;
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            account_claims(false),
        )?;
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            &format!("{name}-sensors"),
            account_claims(true),
        )?;
        let user_jwt = jwt(
            &account,
            &user.public_key(),
            &format!("{name}-worker"),
            json!({
                "type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1,
            }),
        )?;
        let server_config = format!(
            "operator: \"{operator_jwt}\"\nsystem_account: \"{sys}\"\nresolver: MEMORY\n\
             resolver_preload: {{\n  \"{sys}\": \"{system_jwt}\"\n  \"{acc}\": \"{account_jwt}\"\n}}\n",
            sys = system.public_key(),
            acc = account.public_key(),
        );
        let seed = user.seed().map_err(|e| anyhow!("nkey seed: {e}"))?;
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        );
        Ok(Self {
            server_config,
            creds,
        })
    }
}

fn account_claims(jetstream: bool) -> Value {
    let storage = if jetstream { -1 } else { 0 };
    json!({
        "type": "account", "version": 2,
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": storage, "disk_storage": storage, "streams": storage, "consumer": storage,
        },
        "default_permissions": {"pub": {}, "sub": {}},
    })
}

/// A JWT about `subject` (a public nkey) signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> Result<String> {
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|e| anyhow!("signing a JWT: {e}"))?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}
