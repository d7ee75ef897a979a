//! Test certificates, made fresh for each test: a self-signed CA and a server certificate it
//! signs for `localhost` and 127.0.0.1, written as PEM files into a temporary directory.

use std::path::PathBuf;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509};
use tempfile::TempDir;

/// PEM files of a test CA and a server certificate signed by it. The files live as long as this
/// value.
pub struct TestCerts {
    _dir: TempDir,
    /// The CA certificate: what a client (or `upstream.ca_file`) trusts.
    pub ca_path: PathBuf,
    /// The server certificate (leaf only).
    pub cert_path: PathBuf,
    /// The server's private key.
    pub key_path: PathBuf,
}

impl TestCerts {
    /// A new CA and server certificate. The server certificate names `localhost` and
    /// `127.0.0.1` both as an IP address and as a DNS name: OpenSSL's host check, which Pingora
    /// uses for upstream verification, compares the SNI against DNS names only.
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let ca_key = new_key();
        let ca_name = name("arkgate test CA");
        let ca = {
            let mut b = cert_builder(&ca_name, &ca_name, &ca_key, 1);
            b.append_extension(
                BasicConstraints::new()
                    .critical()
                    .ca()
                    .build()
                    .expect("basic constraints"),
            )
            .expect("CA basic constraints");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .expect("key usage"),
            )
            .expect("CA key usage");
            let ski = SubjectKeyIdentifier::new()
                .build(&b.x509v3_context(None, None))
                .expect("subject key id");
            b.append_extension(ski).expect("CA subject key id");
            b.sign(&ca_key, MessageDigest::sha256())
                .expect("self-sign the CA");
            b.build()
        };

        let key = new_key();
        let cert = {
            let mut b = cert_builder(&name("localhost"), &ca_name, &key, 2);
            b.append_extension(BasicConstraints::new().build().expect("basic constraints"))
                .expect("leaf basic constraints");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .build()
                    .expect("key usage"),
            )
            .expect("leaf key usage");
            b.append_extension(
                ExtendedKeyUsage::new()
                    .server_auth()
                    .build()
                    .expect("extended key usage"),
            )
            .expect("leaf extended key usage");
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .dns("127.0.0.1")
                .ip("127.0.0.1")
                .build(&b.x509v3_context(Some(&ca), None))
                .expect("subject alt names");
            b.append_extension(san).expect("leaf SAN");
            let aki = AuthorityKeyIdentifier::new()
                .keyid(true)
                .build(&b.x509v3_context(Some(&ca), None))
                .expect("authority key id");
            b.append_extension(aki).expect("leaf authority key id");
            b.sign(&ca_key, MessageDigest::sha256())
                .expect("sign the leaf");
            b.build()
        };

        let ca_path = dir.path().join("ca.pem");
        let cert_path = dir.path().join("server.pem");
        let key_path = dir.path().join("server.key");
        std::fs::write(&ca_path, ca.to_pem().expect("CA PEM")).expect("write CA");
        std::fs::write(&cert_path, cert.to_pem().expect("cert PEM")).expect("write cert");
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().expect("key PEM"))
            .expect("write key");
        TestCerts {
            _dir: dir,
            ca_path,
            cert_path,
            key_path,
        }
    }

    /// The CA file path as a string, for YAML and curl.
    pub fn ca(&self) -> &str {
        self.ca_path.to_str().expect("temp paths are UTF-8")
    }
}

/// P-256 keys: fast to generate, and accepted by Pingora's upstream signature algorithms.
fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("EC key")).expect("PKey")
}

fn name(cn: &str) -> X509Name {
    let mut b = X509NameBuilder::new().expect("name builder");
    b.append_entry_by_nid(Nid::COMMONNAME, cn)
        .expect("common name");
    b.build()
}

fn cert_builder(
    subject: &X509Name,
    issuer: &X509Name,
    key: &PKey<Private>,
    serial: u32,
) -> X509Builder {
    let mut b = X509::builder().expect("x509 builder");
    b.set_version(2).expect("v3");
    let serial = BigNum::from_u32(serial)
        .and_then(|n| n.to_asn1_integer())
        .expect("serial");
    b.set_serial_number(&serial).expect("serial");
    b.set_subject_name(subject).expect("subject");
    b.set_issuer_name(issuer).expect("issuer");
    b.set_pubkey(key).expect("public key");
    // Valid from an hour ago, so clock granularity never makes a fresh certificate "not yet valid".
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now - 3600).expect("not before"))
        .expect("not before");
    b.set_not_after(&Asn1Time::days_from_now(2).expect("not after"))
        .expect("not after");
    b
}
