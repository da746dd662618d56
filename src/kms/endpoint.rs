//! Which URL the client talks to: `https://kms[-vpc].<region>.aliyuncs.com/` from the region,
//! or an explicit endpoint (`https://…`, or `http://` to a loopback address for the lab and
//! tests: plain HTTP would carry secret values in clear text).
#![forbid(unsafe_code)]

use std::net::IpAddr;

use reqwest::Url;

use super::error::{KmsError, KmsErrorKind};
use crate::config::{KmsSettings, Network};

/// A resolved KMS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL, always with path `/`.
    pub url: Url,
    /// The `Host` header value the request carries and the V3 signature covers: the host,
    /// plus `:port` when the port is not the scheme's default.
    pub host_header: String,
}

impl Endpoint {
    /// Resolves the endpoint from `[kms]`: `endpoint` if set, else `region` (+ `network`).
    pub fn from_settings(settings: &KmsSettings) -> Result<Self, KmsError> {
        if let Some(explicit) = &settings.endpoint {
            return Self::parse(explicit);
        }
        match &settings.region {
            Some(region) => Self::for_region(region, settings.network),
            None => Err(KmsError::new(
                KmsErrorKind::Config,
                "no KMS endpoint: set `region` (e.g. \"cn-hangzhou\") or `endpoint` in [kms]",
            )),
        }
    }

    /// `https://kms.<region>.aliyuncs.com/` or `https://kms-vpc.<region>.aliyuncs.com/`.
    pub fn for_region(region: &str, network: Network) -> Result<Self, KmsError> {
        let valid = !region.is_empty()
            && region.len() <= 64
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !region.starts_with('-')
            && !region.ends_with('-');
        if !valid {
            return Err(KmsError::new(
                KmsErrorKind::Config,
                format!(
                    "invalid KMS region {region:?}: expected a region id such as \"cn-hangzhou\""
                ),
            ));
        }
        let prefix = match network {
            Network::Public => "kms",
            Network::Vpc => "kms-vpc",
        };
        Self::parse(&format!("https://{prefix}.{region}.aliyuncs.com/"))
    }

    /// Parses an explicit endpoint URL. Only `https`, or `http` to a loopback IP address; no
    /// credentials, path, query or fragment in the URL.
    pub fn parse(text: &str) -> Result<Self, KmsError> {
        let bad = |why: &str| {
            KmsError::new(
                KmsErrorKind::Config,
                format!("invalid KMS endpoint {text:?}: {why}"),
            )
        };
        let url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let host = url.host_str().ok_or_else(|| bad("no host"))?.to_owned();
        match url.scheme() {
            "https" => {}
            "http" => {
                let ip: Option<IpAddr> = host.trim_matches(['[', ']']).parse().ok();
                if !ip.is_some_and(|ip| ip.is_loopback()) {
                    return Err(bad(
                        "plain http is allowed only to a loopback address such as \
                         http://127.0.0.1:9100 (the lab emulator); use https",
                    ));
                }
            }
            _ => return Err(bad("the scheme must be https")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials do not belong in the URL"));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("give only scheme, host and optional port"));
        }
        let host_header = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host,
        };
        Ok(Self { url, host_header })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_endpoints() {
        let e = Endpoint::for_region("cn-hangzhou", Network::Public).expect("valid");
        assert_eq!(e.url.as_str(), "https://kms.cn-hangzhou.aliyuncs.com/");
        assert_eq!(e.host_header, "kms.cn-hangzhou.aliyuncs.com");
        let e = Endpoint::for_region("ap-southeast-1", Network::Vpc).expect("valid");
        assert_eq!(e.host_header, "kms-vpc.ap-southeast-1.aliyuncs.com");
        for bad in ["", "CN-hangzhou", "cn hangzhou", "cn.evil.com/x", "-cn"] {
            let e = Endpoint::for_region(bad, Network::Public).expect_err(bad);
            assert_eq!(e.kind, KmsErrorKind::Config);
        }
    }

    #[test]
    fn explicit_endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:9100").expect("loopback http");
        assert_eq!(e.host_header, "127.0.0.1:9100");
        assert_eq!(e.url.as_str(), "http://127.0.0.1:9100/");
        let e = Endpoint::parse("http://[::1]:8080/").expect("v6 loopback");
        assert_eq!(e.host_header, "[::1]:8080");
        let e = Endpoint::parse("https://kst-abc.cryptoservice.kms.aliyuncs.com:443").expect("ok");
        assert_eq!(e.host_header, "kst-abc.cryptoservice.kms.aliyuncs.com");
        let e = Endpoint::parse("https://kms.example:8443").expect("ok");
        assert_eq!(e.host_header, "kms.example:8443");
        for bad in [
            "http://10.0.0.1:9100",
            "http://localhost:9100",
            "http://kms.cn-hangzhou.aliyuncs.com",
            "ftp://127.0.0.1",
            "https://u:p@kms.example",
            "https://kms.example/path",
            "https://kms.example/?a=b",
            "not a url",
        ] {
            let e = Endpoint::parse(bad).expect_err(bad);
            assert_eq!(e.kind, KmsErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn settings_precedence() {
        let mut s: KmsSettings = toml::from_str("region = \"cn-shanghai\"").expect("parses");
        assert_eq!(
            Endpoint::from_settings(&s).expect("ok").host_header,
            "kms.cn-shanghai.aliyuncs.com"
        );
        s.endpoint = Some("http://127.0.0.1:1".into());
        assert_eq!(
            Endpoint::from_settings(&s).expect("ok").host_header,
            "127.0.0.1:1"
        );
        s.endpoint = None;
        s.region = None;
        assert_eq!(
            Endpoint::from_settings(&s).expect_err("none").kind,
            KmsErrorKind::Config
        );
    }
}
