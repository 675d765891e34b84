//! The cluster's cryptography, all from audited crates: the controller's Ed25519 key that signs
//! every publication (ed25519-dalek), each worker's age X25519 key pair that publications and
//! bundles are sealed to (age), and the join-token proof (blake3 keyed hash). No construction of
//! our own: sign, seal and MAC are used exactly as their libraries define them.

use std::str::FromStr;

use age::secrecy::ExposeSecret;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::ids::{Fingerprint, NodeId};
use crate::wire::{Publication, SIGNATURE_BYTES};

/// Secrets' names in the node's database (`Store::secret`).
pub const SIGNING_SECRET: &str = "controller-signing-key";
pub const SEAL_SECRET: &str = "seal-key";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("stored key material is damaged: {0}")]
    Damaged(String),
    #[error("the controller key is not a valid Ed25519 public key")]
    BadControllerKey,
    #[error("the signature is not the controller's")]
    BadSignature,
    #[error("not a valid age X25519 recipient: {0}")]
    BadRecipient(String),
    #[error("cannot seal: {0}")]
    Seal(String),
    #[error("cannot open the sealed bytes (not sealed to this machine, or altered): {0}")]
    Open(String),
}

/// The controller's signing key.
pub struct ControllerKey(SigningKey);

impl ControllerKey {
    pub fn generate() -> Self {
        ControllerKey(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// From [`ControllerKey::secret_bytes`].
    pub fn from_secret(bytes: &[u8]) -> Result<Self, KeyError> {
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::Damaged(format!("signing key of {} bytes", bytes.len())))?;
        Ok(ControllerKey(SigningKey::from_bytes(&seed)))
    }

    pub fn secret_bytes(&self) -> Vec<u8> {
        self.0.to_bytes().to_vec()
    }

    /// What workers receive on admission and verify publications with.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub fn sign_digest(&self, digest: &[u8; 32]) -> Vec<u8> {
        self.0.sign(digest).to_bytes().to_vec()
    }

    /// Seals `body` to `recipient` and signs the result: one publication of `machine`'s channel.
    pub fn publication(
        &self,
        machine: NodeId,
        seq: u64,
        recipient: &str,
        body: &[u8],
    ) -> Result<Publication, KeyError> {
        let sealed = seal_to(recipient, body)?;
        Ok(self.sign_publication(machine, seq, sealed))
    }

    /// Signs bytes already sealed to `machine` as publication `seq` of its channel (Ed25519 is
    /// deterministic: no randomness here).
    pub fn sign_publication(&self, machine: NodeId, seq: u64, sealed: Vec<u8>) -> Publication {
        let signature = self.sign_digest(&publication_digest(machine, seq, &sealed));
        Publication {
            machine,
            seq,
            sealed,
            signature,
        }
    }
}

/// Seals a publication's body to a machine's age recipient. The controller core is given
/// one when it is built and draws no randomness of its own: sealing is the only step of a
/// publication that needs any (age's file key, ephemeral X25519 key and nonce).
pub trait Sealer: Send {
    fn seal(&mut self, recipient: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError>;
}

/// [`seal_to`]: age, which draws its randomness from the operating system's CSPRNG (age
/// takes no RNG of ours, and its format is not ours to rebuild). What the controller and the
/// cluster simulation use; nothing in the simulation depends on the ciphertext's bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgeSealer;

impl Sealer for AgeSealer {
    fn seal(&mut self, recipient: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        seal_to(recipient, plaintext)
    }
}

impl std::fmt::Debug for ControllerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControllerKey({})", hex::encode(self.public()))
    }
}

/// A worker's copy of the controller's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerVerifier(VerifyingKey);

impl ControllerVerifier {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(ControllerVerifier)
            .map_err(|_| KeyError::BadControllerKey)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn verify_digest(&self, digest: &[u8; 32], signature: &[u8]) -> Result<(), KeyError> {
        let sig: [u8; SIGNATURE_BYTES] =
            signature.try_into().map_err(|_| KeyError::BadSignature)?;
        self.0
            .verify_strict(digest, &Signature::from_bytes(&sig))
            .map_err(|_| KeyError::BadSignature)
    }

    /// Checks the publication's signature (before anything is decrypted).
    pub fn verify_publication(&self, p: &Publication) -> Result<(), KeyError> {
        self.verify_digest(
            &publication_digest(p.machine, p.seq, &p.sealed),
            &p.signature,
        )
    }
}

/// What the controller signs for a publication: the machine, the channel sequence and the hash
/// of the sealed bytes, under a domain-separating context.
pub fn publication_digest(machine: NodeId, seq: u64, sealed: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("outpost 2026 publication v1");
    h.update(&machine.to_bytes());
    h.update(&seq.to_be_bytes());
    h.update(blake3::hash(sealed).as_bytes());
    *h.finalize().as_bytes()
}

/// A worker's age X25519 identity: publications and bundles are sealed to its recipient.
pub struct SealKey(age::x25519::Identity);

impl SealKey {
    pub fn generate() -> Self {
        SealKey(age::x25519::Identity::generate())
    }

    /// From [`SealKey::secret_bytes`] (the `AGE-SECRET-KEY-1...` string).
    pub fn from_secret(bytes: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| KeyError::Damaged("seal key is not UTF-8".into()))?;
        age::x25519::Identity::from_str(text)
            .map(SealKey)
            .map_err(|e| KeyError::Damaged(format!("seal key: {e}")))
    }

    pub fn secret_bytes(&self) -> Vec<u8> {
        self.0.to_string().expose_secret().as_bytes().to_vec()
    }

    /// The public recipient, `age1...`.
    pub fn recipient(&self) -> String {
        self.0.to_public().to_string()
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        age::decrypt(&self.0, sealed).map_err(|e| KeyError::Open(e.to_string()))
    }

    /// The age identity itself, for streaming decryption of bundles.
    pub fn identity(&self) -> &age::x25519::Identity {
        &self.0
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.recipient())
    }
}

pub fn parse_recipient(recipient: &str) -> Result<age::x25519::Recipient, KeyError> {
    age::x25519::Recipient::from_str(recipient)
        .map_err(|e| KeyError::BadRecipient(format!("{recipient:?}: {e}")))
}

/// Seals `plaintext` so that only the holder of `recipient`'s identity can open it.
pub fn seal_to(recipient: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
    let r = parse_recipient(recipient)?;
    age::encrypt(&r, plaintext).map_err(|e| KeyError::Seal(e.to_string()))
}

/// What a worker with a join token presents: a MAC of its own certificate fingerprint under a
/// key derived from the token, so the token itself never travels and a proof cannot be reused
/// by another certificate.
pub fn token_proof(token: &[u8], fingerprint: &Fingerprint) -> [u8; 32] {
    let key = blake3::derive_key("outpost 2026 join token v1", token);
    *blake3::keyed_hash(&key, &fingerprint.0).as_bytes()
}

/// Constant-time comparison of a presented proof with the expected one.
pub fn token_proof_matches(token: &[u8], fingerprint: &Fingerprint, proof: &[u8; 32]) -> bool {
    blake3::Hash::from(token_proof(token, fingerprint)) == blake3::Hash::from(*proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_verifies_and_opens_only_for_its_machine() {
        let ck = ControllerKey::generate();
        let ck2 = ControllerKey::from_secret(&ck.secret_bytes()).unwrap();
        assert_eq!(ck.public(), ck2.public());
        let seal = SealKey::generate();
        let seal2 = SealKey::from_secret(&seal.secret_bytes()).unwrap();
        assert_eq!(seal.recipient(), seal2.recipient());
        let other = SealKey::generate();
        let p = ck
            .publication(NodeId(7), 3, &seal.recipient(), b"pool")
            .unwrap();
        let v = ControllerVerifier::from_bytes(&ck.public()).unwrap();
        v.verify_publication(&p).unwrap();
        assert_eq!(seal2.open(&p.sealed).unwrap(), b"pool");
        assert!(matches!(other.open(&p.sealed), Err(KeyError::Open(_))));
        // Any change to what is signed is caught before decryption.
        let mut q = p.clone();
        q.seq = 4;
        assert_eq!(v.verify_publication(&q), Err(KeyError::BadSignature));
        let mut q = p.clone();
        q.machine = NodeId(8);
        assert_eq!(v.verify_publication(&q), Err(KeyError::BadSignature));
        for i in [0, p.sealed.len() / 2, p.sealed.len() - 1] {
            let mut q = p.clone();
            q.sealed[i] ^= 1;
            assert_eq!(v.verify_publication(&q), Err(KeyError::BadSignature));
        }
        let mut q = p.clone();
        q.signature.pop();
        assert_eq!(v.verify_publication(&q), Err(KeyError::BadSignature));
        // A forged signature by another key.
        let forger = ControllerKey::generate();
        let f = forger
            .publication(NodeId(7), 3, &seal.recipient(), b"evil")
            .unwrap();
        assert_eq!(v.verify_publication(&f), Err(KeyError::BadSignature));
    }

    #[test]
    fn token_proofs_bind_the_certificate() {
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        let p = token_proof(b"secret", &a);
        assert!(token_proof_matches(b"secret", &a, &p));
        assert!(!token_proof_matches(b"secret", &b, &p));
        assert!(!token_proof_matches(b"other", &a, &p));
    }
}
