//! Certificate pinning, for a server whose certificate no public CA signed: a Proxmox VE node
//! (its API serves a self-signed certificate by default).
//!
//! The server is trusted when the SHA-256 fingerprint of its certificate is the configured one —
//! the value Proxmox shows under the node's "Certificates" (`AB:CD:…`), or
//! `openssl x509 -noout -fingerprint -sha256`. Name and validity dates are not checked: the pin
//! says exactly which certificate is meant. The handshake is still verified against the pinned
//! certificate's key, so only the holder of that key passes. This is what
//! `danger_accept_invalid_certs` should be replaced with: that one trusts any certificate at
//! all, so anyone on the path can read the API token.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 fingerprint of a certificate (its DER bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Whether `der` is the pinned certificate (in constant time).
    pub fn matches(&self, der: &[u8]) -> bool {
        Sha256::digest(der).as_slice().ct_eq(&self.0).into()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a TLS fingerprint is 32 bytes of hex (64 digits), colons between bytes allowed: {0}")]
pub struct FingerprintError(&'static str);

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    /// `AB:CD:…` (as Proxmox and openssl print it) or plain hex, either case.
    fn from_str(s: &str) -> Result<Self, FingerprintError> {
        let s = s.trim();
        let s = s.strip_prefix("sha256//").unwrap_or(s);
        let digits: String = if s.contains(':') {
            let parts: Vec<&str> = s.split(':').collect();
            if parts.iter().any(|p| p.len() != 2) {
                return Err(FingerprintError("every colon-separated part must be two hex digits"));
            }
            parts.concat()
        } else {
            s.to_owned()
        };
        if digits.len() != 64 {
            return Err(FingerprintError("it must be 64 hex digits long"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes).map_err(|_| FingerprintError("it must be hex digits only"))?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        f.write_str(&parts.join(":"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// From config files: the same text [`FromStr`] takes.
impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A TLS client configuration that trusts exactly the certificate `pin` names.
pub fn pinned_client_config(pin: Fingerprint) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned { pin, provider: provider.clone() });
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth()
}

#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pin.matches(end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(
                expected = %self.pin,
                presented = %Fingerprint::of(end_entity.as_ref()),
                "TLS certificate does not match the pinned fingerprint"
            );
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_proxmox_and_openssl_print_them() {
        let colons = "AB:".repeat(31) + "CD";
        let fp: Fingerprint = colons.parse().unwrap();
        assert_eq!(fp.to_string(), colons);
        assert_eq!(colons.to_lowercase().replace(':', "").parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!(" {colons}\n").parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        for bad in [
            "",
            "AB:CD",
            &"AB:".repeat(32),
            &("ABC:".to_owned() + &"AB:".repeat(30) + "CD"),
            &"A".repeat(63),
            &"A".repeat(66),
            &"ZZ".repeat(32),
            &("AB::".to_owned() + &"AB:".repeat(30) + "AB"),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_fingerprint_matches_its_certificate_only() {
        let fp = Fingerprint::of(b"certificate one");
        assert!(fp.matches(b"certificate one"));
        assert!(!fp.matches(b"certificate two"));
    }
}
