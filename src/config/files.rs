//! Every check that touches the filesystem: the files the configuration names must exist, be
//! readable and hold what they should, so that a bad one is an error at start (and from
//! `arkgate -t`), never a panic or a failed handshake later.
//!
//! [`check_files`] runs them all; [`Config::from_file`] calls it after validating the text.
//! A new file-valued key gets its check here and one line in [`check_files`].

use std::path::Path;

use pingora::listeners::tls::TlsSettings;
use pingora::tls::x509::X509;

use super::{Config, ConfigError, KeyPairProblem, TlsFiles};

/// What listener certificate errors name as their key.
const LISTEN_TLS: &str = "listen tls";

/// Checks every file the configuration names: each TLS listener's certificate and key, and
/// the upstream `ca_file`.
pub fn check_files(cfg: &Config) -> Result<(), ConfigError> {
    for files in cfg.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        tls_settings(files)?;
    }
    if let Some(ca) = &cfg.upstream.ca_file {
        check_ca_file("upstream.ca_file", ca)?;
    }
    if let Some(clients) = &cfg.clients {
        upstream_key("clients.upstream_key_file", &clients.upstream_key_file)?;
    }
    Ok(())
}

/// The upstream key file must be readable and hold one non-empty line; a mode wider than 0600
/// is a warning (logged here), not an error. Errors and warnings name the path, never the key.
pub fn upstream_key(key: &str, path: &Path) -> Result<crate::clients::UpstreamKey, ConfigError> {
    let read = crate::clients::read_upstream_key(path)
        .map_err(|why| ConfigError::invalid(key, why.trim_start_matches(&format!("{key}: "))))?;
    if let Some(warning) = &read.warning {
        log::warn!("{warning}");
    }
    Ok(read)
}

/// Pingora TLS settings for a listener (intermediate profile, h2 offered by ALPN). Fails,
/// naming the file, when the certificate or key is missing or not PEM, or when the key does
/// not match the certificate.
pub fn tls_settings(files: &TlsFiles) -> Result<TlsSettings, ConfigError> {
    let cert = utf8_file(LISTEN_TLS, &files.cert_path)?;
    let key = utf8_file(LISTEN_TLS, &files.key_path)?;
    let pair_error = |problem| ConfigError::KeyPair {
        key: LISTEN_TLS.to_string(),
        cert_path: files.cert_path.clone(),
        key_path: files.key_path.clone(),
        problem,
    };
    let mut settings = TlsSettings::intermediate(cert, key)
        .map_err(|e| pair_error(KeyPairProblem::Unusable(e.root_cause().to_string())))?;
    settings
        .check_private_key()
        .map_err(|_| pair_error(KeyPairProblem::Mismatch))?;
    settings.enable_h2();
    Ok(settings)
}

/// A CA bundle must be a readable file of PEM certificates: Pingora loads it into every
/// upstream connector and panics on one it cannot use.
fn check_ca_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    // Pingora takes the path as a string: a non-UTF-8 one would be dropped, not rejected.
    utf8_file(key, path)?;
    let pem =
        std::fs::read(path).map_err(|_| ConfigError::file(key, path, "is not a readable file"))?;
    match X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(()),
        _ => Err(ConfigError::file(key, path, "holds no PEM certificate")),
    }
}

/// `path` as a string, once it names an existing file.
fn utf8_file<'a>(key: &str, path: &'a Path) -> Result<&'a str, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::file(key, path, "is not a readable file"));
    }
    path.to_str()
        .ok_or_else(|| ConfigError::file(key, path, "is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use openssl::asn1::Asn1Time;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::{X509Builder, X509NameBuilder};

    use super::*;
    use crate::config::tests::MINIMAL;

    /// A self-signed certificate and its key, PEM-encoded.
    fn self_signed() -> (Vec<u8>, Vec<u8>) {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("curve");
        let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey");
        let mut name = X509NameBuilder::new().expect("name");
        name.append_entry_by_text("CN", "arkgate unit test")
            .expect("cn");
        let name = name.build();
        let mut b = X509Builder::new().expect("builder");
        b.set_version(2).expect("version");
        b.set_subject_name(&name).expect("subject");
        b.set_issuer_name(&name).expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&Asn1Time::days_from_now(0).expect("now"))
            .expect("not before");
        b.set_not_after(&Asn1Time::days_from_now(1).expect("later"))
            .expect("not after");
        b.sign(&key, MessageDigest::sha256()).expect("sign");
        let cert = b.build().to_pem().expect("cert pem");
        (cert, key.private_key_to_pem_pkcs8().expect("key pem"))
    }

    fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// What `Config::from_file` (the `-t` path) says about `yaml`, written into `dir`.
    fn from_file(dir: &Path, yaml: &str) -> Result<Config, String> {
        let path = write(dir, "arkgate.yaml", yaml.as_bytes());
        Config::from_file(&path).map_err(|e| e.to_string())
    }

    fn with_ca(ca: &Path) -> String {
        format!("{MINIMAL}upstream: {{ca_file: \"{}\"}}\n", ca.display())
    }

    #[test]
    fn a_missing_ca_file_is_rejected_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = dir.path().join("missing.pem");
        let e = from_file(dir.path(), &with_ca(&ca)).expect_err("missing CA");
        assert_eq!(
            e,
            format!("upstream.ca_file: {} is not a readable file", ca.display())
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_rejected_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        for (name, text) in [
            ("garbage.pem", &b"not a certificate\n"[..]),
            ("empty.pem", b""),
        ] {
            let ca = write(dir.path(), name, text);
            let e = from_file(dir.path(), &with_ca(&ca)).expect_err("unusable CA");
            assert_eq!(
                e,
                format!(
                    "upstream.ca_file: {} holds no PEM certificate",
                    ca.display()
                )
            );
        }
    }

    #[test]
    fn a_ca_file_of_pem_certificates_is_accepted() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = write(dir.path(), "ca.pem", &self_signed().0);
        let c = from_file(dir.path(), &with_ca(&ca)).expect("valid CA");
        assert_eq!(c.upstream.ca_file.as_deref(), Some(ca.as_path()));
    }

    #[test]
    fn a_non_utf8_ca_path_is_rejected() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("dir");
        let name = std::ffi::OsStr::from_bytes(b"ca-\xff.pem");
        let ca = dir.path().join(name);
        std::fs::write(&ca, self_signed().0).expect("write");
        let e = check_ca_file("upstream.ca_file", &ca).expect_err("non-UTF-8 path");
        assert_eq!(e.key(), Some("upstream.ca_file"));
        assert!(e.to_string().ends_with(" is not UTF-8"), "{e}");
    }

    #[test]
    fn from_file_checks_listener_certificates_too() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        let missing = dir.path().join("missing.pem");
        let listen = |c: &Path| {
            format!(
                "listen: [{{addr: \"127.0.0.1:1\", tls: {{cert_path: \"{}\", key_path: \"{}\"}}}}]\n",
                c.display(),
                key.display()
            )
        };
        from_file(dir.path(), &listen(&cert)).expect("a good pair");
        let e = from_file(dir.path(), &listen(&missing)).expect_err("missing certificate");
        assert_eq!(
            e,
            format!("listen tls: {} is not a readable file", missing.display())
        );
    }

    #[test]
    fn from_yaml_does_not_touch_the_filesystem() {
        let c = Config::from_yaml(&with_ca(Path::new("/nonexistent/ca.pem"))).expect("valid");
        assert!(check_files(&c).is_err());
    }
}
