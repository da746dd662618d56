//! From the raw file to a checked [`Config`]: every problem is collected with its line.
#![forbid(unsafe_code)]

use super::raw::{RawAccount, RawBastion, RawConfig, RawEngineer, RawGrant, RawHost};
use super::*;
use crate::login::{check_host_name, check_user_name, LoginPart};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use toml::Spanned;

/// Longest KMS secret name (KMS allows 192 characters).
const MAX_SECRET_NAME_LEN: usize = 192;
/// Longest host address (a full DNS name).
const MAX_ADDRESS_LEN: usize = 253;

struct Ctx {
    /// Byte offset at which each line after the first starts: a line number is one binary
    /// search away (counting newlines per lookup made large inventories quadratic).
    line_starts: Vec<usize>,
    problems: Vec<Problem>,
    warnings: Vec<(Option<usize>, String)>,
}

impl Ctx {
    fn new(text: &str) -> Self {
        let line_starts = text
            .bytes()
            .enumerate()
            .filter(|&(_, c)| c == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        Self {
            line_starts,
            problems: vec![],
            warnings: vec![],
        }
    }
    /// 1-based line of byte `offset`.
    fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset) + 1
    }
    fn line<T>(&self, s: &Spanned<T>) -> Option<usize> {
        Some(self.line_of(s.span().start))
    }
    fn err<T>(&mut self, at: &Spanned<T>, message: String) {
        let line = self.line(at);
        self.problems.push(Problem::at(line, message));
    }
    fn err_at(&mut self, line: Option<usize>, message: String) {
        self.problems.push(Problem::at(line, message));
    }
    fn warn<T>(&mut self, at: &Spanned<T>, message: String) {
        let line = self.line(at);
        self.warnings.push((line, message));
    }
}

pub(super) fn build(
    text: &str,
    origin: &Path,
    local: Option<&LocalDb>,
) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let ctx = Ctx::new(text);
        let line = e.span().map(|s| ctx.line_of(s.start));
        ConfigError::syntax(origin, Problem::at(line, e.message().trim().to_owned()))
    })?;
    let mut ctx = Ctx::new(text);

    let kms = match raw.kms {
        Some(k) => {
            check_kms(&mut ctx, &k);
            k.into_inner()
        }
        None => KmsSettings::default(),
    };
    let bastion = check_bastion(&mut ctx, &raw.bastion, local);
    let audit = AuditSettings {
        file: raw
            .audit
            .file
            .as_ref()
            .map(|f| absolute_path(&mut ctx, f, "[audit] file")),
        syslog: raw.audit.syslog.unwrap_or(DEFAULT_AUDIT_SYSLOG),
    };
    let hosts = check_hosts(&mut ctx, &raw.host);
    let engineers = check_engineers(&mut ctx, &raw.engineer, &bastion, local);
    let grants = check_grants(&mut ctx, &raw.grant, &hosts, &engineers);

    if !ctx.problems.is_empty() {
        return Err(ConfigError::invalid(origin, ctx.problems));
    }
    let warnings = ctx
        .warnings
        .into_iter()
        .map(|(line, message)| ConfigWarning {
            path: origin.to_owned(),
            line,
            message,
        })
        .collect();
    Ok(Config {
        kms,
        bastion,
        audit,
        hosts,
        engineers,
        grants,
        warnings,
        origin: origin.to_owned(),
    })
}

fn check_kms(ctx: &mut Ctx, k: &Spanned<KmsSettings>) {
    let s = k.get_ref();
    if s.deadline_ms == 0 {
        ctx.err(k, "[kms] deadline_ms must be greater than 0".into());
    }
    if let Some(ep) = &s.endpoint {
        if !(ep.starts_with("https://") || ep.starts_with("http://")) {
            ctx.err(k, format!("[kms] endpoint {ep:?} must start with https:// (or http:// to a loopback address)"));
        }
    }
    if s.region.is_none() && s.endpoint.is_none() {
        ctx.err(
            k,
            "[kms] needs `region` (e.g. \"cn-hangzhou\") or an explicit `endpoint`".into(),
        );
    }
    if let Some(r) = &s.region {
        if r.is_empty()
            || !r
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            ctx.err(
                k,
                format!("[kms] region {r:?} is not a region id like \"cn-hangzhou\""),
            );
        }
    }
}

fn opt_string(s: &Option<Spanned<String>>, default: &str) -> String {
    s.as_ref()
        .map_or_else(|| default.to_owned(), |v| v.get_ref().clone())
}

fn absolute_path(ctx: &mut Ctx, s: &Spanned<String>, what: &str) -> PathBuf {
    let v = s.get_ref();
    if !v.starts_with('/') || v.chars().any(|c| c.is_control() || c == ':') {
        ctx.err(
            s,
            format!("{what} must be an absolute path without ':' or control characters, got {v:?}"),
        );
    }
    PathBuf::from(v)
}

fn opt_path(ctx: &mut Ctx, s: &Option<Spanned<String>>, default: &str, what: &str) -> PathBuf {
    match s {
        Some(v) => absolute_path(ctx, v, what),
        None => PathBuf::from(default),
    }
}

fn check_bastion(ctx: &mut Ctx, b: &RawBastion, local: Option<&LocalDb>) -> BastionSettings {
    let section_line = None;
    let group = opt_string(&b.group, DEFAULT_BASTION_GROUP);
    let group_line = b.group.as_ref().and_then(|g| ctx.line(g)).or(section_line);
    if let Err(e) = check_user_name(&group, LoginPart::Engineer) {
        ctx.err_at(
            group_line,
            format!("[bastion] group {group:?} is not a valid group name: {e}"),
        );
    }
    let gid = b.gid.as_ref().map_or(DEFAULT_BASTION_GID, |g| *g.get_ref());
    let gid_line = b.gid.as_ref().and_then(|g| ctx.line(g));
    if gid == 0 {
        ctx.err_at(gid_line, "[bastion] gid must not be 0".into());
    }
    let uid_min = b.uid_min.as_ref().map_or(DEFAULT_UID_MIN, |g| *g.get_ref());
    let uid_max = b.uid_max.as_ref().map_or(DEFAULT_UID_MAX, |g| *g.get_ref());
    let min_line = b.uid_min.as_ref().and_then(|g| ctx.line(g));
    let max_line = b.uid_max.as_ref().and_then(|g| ctx.line(g));
    if uid_min < LOWEST_UID_MIN {
        ctx.err_at(min_line, format!("[bastion] uid_min {uid_min} is below {LOWEST_UID_MIN}: engineer uids must not overlap system accounts"));
    }
    if uid_max > HIGHEST_UID_MAX {
        ctx.err_at(
            max_line,
            format!("[bastion] uid_max {uid_max} is above {HIGHEST_UID_MAX}"),
        );
    }
    if uid_max < uid_min {
        ctx.err_at(
            max_line.or(min_line),
            format!("[bastion] uid_max {uid_max} is below uid_min {uid_min}"),
        );
    }
    if let Some(db) = local {
        let clashes: Vec<String> = db
            .users
            .iter()
            .filter(|(_, uid)| (uid_min..=uid_max).contains(uid))
            .map(|(n, uid)| format!("{n} ({uid})"))
            .collect();
        if !clashes.is_empty() {
            ctx.err_at(
                min_line.or(max_line),
                format!(
                    "the engineer uid range {uid_min}..={uid_max} contains local users: {}; choose a range no local user occupies",
                    clashes.join(", ")
                ),
            );
        }
        if let Some((n, _)) = db.groups.iter().find(|(_, g)| *g == gid) {
            ctx.err_at(gid_line, format!("[bastion] gid {gid} is already used by the local group {n:?}; choose a free gid"));
        }
        if db.group(&group).is_some() {
            ctx.err_at(
                group_line,
                format!("[bastion] group {group:?} exists as a local group; the bastion group must come only from kmsbastion (remove the local group or choose another name)"),
            );
        }
    }
    let service_user = opt_string(&b.service_user, DEFAULT_SERVICE_USER);
    if let Err(e) = check_user_name(&service_user, LoginPart::Engineer) {
        let line = b.service_user.as_ref().and_then(|g| ctx.line(g));
        ctx.err_at(
            line,
            format!("[bastion] service_user {service_user:?} is not a valid user name: {e}"),
        );
    }
    let connect_timeout_s = b
        .connect_timeout_s
        .as_ref()
        .map_or(DEFAULT_CONNECT_TIMEOUT_S, |g| *g.get_ref());
    if connect_timeout_s == 0 || connect_timeout_s > MAX_CONNECT_TIMEOUT_S {
        let line = b.connect_timeout_s.as_ref().and_then(|g| ctx.line(g));
        ctx.err_at(
            line,
            format!("[bastion] connect_timeout_s must be between 1 and {MAX_CONNECT_TIMEOUT_S}"),
        );
    }
    BastionSettings {
        home: opt_path(ctx, &b.home, DEFAULT_HOME, "[bastion] home"),
        shell: opt_path(ctx, &b.shell, DEFAULT_SHELL, "[bastion] shell"),
        broker: opt_path(ctx, &b.broker, DEFAULT_BROKER, "[bastion] broker"),
        ssh: opt_path(ctx, &b.ssh, DEFAULT_SSH, "[bastion] ssh"),
        runtime_dir: opt_path(
            ctx,
            &b.runtime_dir,
            DEFAULT_RUNTIME_DIR,
            "[bastion] runtime_dir",
        ),
        group,
        gid,
        uid_min,
        uid_max,
        service_user,
        connect_timeout_s,
    }
}

fn check_address(a: &str) -> Result<(), String> {
    if a.is_empty() {
        return Err("address is empty".into());
    }
    if a.len() > MAX_ADDRESS_LEN {
        return Err(format!("address is longer than {MAX_ADDRESS_LEN} bytes"));
    }
    if a.starts_with('-') {
        return Err(format!("address {a:?} must not start with '-'"));
    }
    if a.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if let Some(c) = a
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '-'))
    {
        return Err(format!(
            "address {a:?} is neither an IP address nor a DNS name ({c:?} is not allowed)"
        ));
    }
    Ok(())
}

fn check_secret_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_SECRET_NAME_LEN {
        return Err(format!(
            "secret name must be 1 to {MAX_SECRET_NAME_LEN} characters"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_/+=.@-".contains(*c)))
    {
        return Err(format!(
            "secret name {s:?} contains {c:?} (KMS secret names use letters, digits and _/+=.@-)"
        ));
    }
    Ok(())
}

fn check_hosts(ctx: &mut Ctx, raw: &[RawHost]) -> Vec<Host> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut hosts = Vec::with_capacity(raw.len());
    for h in raw {
        let name = h.name.get_ref();
        if let Err(e) = check_host_name(name) {
            ctx.err(
                &h.name,
                format!("host name {name:?} does not fit the login grammar: {e}"),
            );
        }
        if let Some(prev) = seen.insert(name.clone(), ctx.line_of(h.name.span().start)) {
            ctx.err(
                &h.name,
                format!("host {name:?} is defined twice (first on line {prev})"),
            );
        }
        if let Err(e) = check_address(h.address.get_ref()) {
            ctx.err(&h.address, format!("host {name:?}: {e}"));
        }
        let port = h.port.as_ref().map_or(DEFAULT_SSH_PORT, |p| *p.get_ref());
        if port == 0 {
            if let Some(p) = &h.port {
                ctx.err(
                    p,
                    format!("host {name:?}: port must be between 1 and 65535"),
                );
            }
        }
        let mut host_keys = Vec::new();
        for k in &h.host_keys {
            match parse_public_key(k.get_ref()) {
                Ok(key) => host_keys.push(key.key()),
                Err(e) => ctx.err(k, format!("host {name:?}: host_keys: {e}")),
            }
        }
        if h.host_keys.is_empty() {
            ctx.warn(
                &h.name,
                format!("host {name:?} has no pinned host_keys: it is unusable (connections to it are refused) until you add its public host key"),
            );
        }
        if let Some(id) = &h.instance_id {
            let v = id.get_ref();
            if v.is_empty()
                || v.len() > 64
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                ctx.err(
                    id,
                    format!(
                        "host {name:?}: instance_id {v:?} is not an instance id like \"i-bp1abc…\""
                    ),
                );
            }
        }
        let accounts = check_accounts(ctx, name, &h.account);
        if accounts.is_empty() {
            ctx.warn(
                &h.name,
                format!("host {name:?} has no [[host.account]]: nobody can reach it"),
            );
        }
        hosts.push(Host {
            name: name.clone(),
            address: h.address.get_ref().clone(),
            port,
            host_keys,
            instance_id: h.instance_id.as_ref().map(|i| i.get_ref().clone()),
            accounts,
        });
    }
    hosts
}

fn check_accounts(ctx: &mut Ctx, host: &str, raw: &[RawAccount]) -> Vec<HostAccount> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for a in raw {
        let name = a.name.get_ref();
        if let Err(e) = check_user_name(name, LoginPart::Account) {
            ctx.err(
                &a.name,
                format!(
                    "account name {name:?} on host {host:?} does not fit the login grammar: {e}"
                ),
            );
        }
        if !seen.insert(name.clone()) {
            ctx.err(
                &a.name,
                format!("account {name:?} is defined twice on host {host:?}"),
            );
        }
        if let Err(e) = check_secret_name(a.secret.get_ref()) {
            ctx.err(&a.secret, format!("account {name}@{host}: {e}"));
        }
        out.push(HostAccount {
            name: name.clone(),
            secret: a.secret.get_ref().clone(),
        });
    }
    out
}

fn check_engineers(
    ctx: &mut Ctx,
    raw: &[RawEngineer],
    b: &BastionSettings,
    local: Option<&LocalDb>,
) -> Vec<Engineer> {
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut uids: HashMap<u32, String> = HashMap::new();
    let mut keys_seen: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for e in raw {
        let name = e.name.get_ref();
        if let Err(err) = check_user_name(name, LoginPart::Engineer) {
            ctx.err(
                &e.name,
                format!("engineer name {name:?} does not fit the login grammar: {err}"),
            );
        }
        if let Some(prev) = names.insert(name.clone(), ctx.line_of(e.name.span().start)) {
            ctx.err(
                &e.name,
                format!("engineer {name:?} is defined twice (first on line {prev})"),
            );
        }
        if let Some(db) = local {
            if db.user(name).is_some() {
                ctx.err(&e.name, format!("engineer {name:?} has the name of a local user; local users always win in NSS, so rename the engineer"));
            }
        }
        let uid = *e.uid.get_ref();
        if !(b.uid_min..=b.uid_max).contains(&uid) {
            ctx.err(
                &e.uid,
                format!(
                    "engineer {name:?}: uid {uid} is outside [bastion] uid_min..=uid_max ({}..={})",
                    b.uid_min, b.uid_max
                ),
            );
        }
        if let Some(other) = uids.insert(uid, name.clone()) {
            ctx.err(
                &e.uid,
                format!("engineer {name:?}: uid {uid} is already used by engineer {other:?}"),
            );
        }
        let mut keys = Vec::new();
        for k in &e.keys {
            match parse_public_key(k.get_ref()) {
                Ok(key) => {
                    if let Some(owner) = keys_seen.insert(key.key(), name.clone()) {
                        ctx.err(k, format!("engineer {name:?}: this key already belongs to engineer {owner:?}; every engineer needs their own key"));
                    }
                    keys.push(match &key.comment {
                        Some(c) => format!("{} {}", key.key(), c),
                        None => key.key(),
                    });
                }
                Err(err) => ctx.err(k, format!("engineer {name:?}: keys: {err}")),
            }
        }
        if e.keys.is_empty() {
            ctx.warn(
                &e.name,
                format!("engineer {name:?} has no keys and cannot log in"),
            );
        }
        let mut groups = Vec::new();
        for g in &e.groups {
            if let Err(err) = check_user_name(g.get_ref(), LoginPart::Engineer) {
                ctx.err(
                    g,
                    format!(
                        "engineer {name:?}: group name {:?} is not valid: {err}",
                        g.get_ref()
                    ),
                );
            }
            groups.push(g.get_ref().clone());
        }
        out.push(Engineer {
            name: name.clone(),
            uid,
            keys,
            groups,
        });
    }
    if let Some(db) = local {
        // A local user whose name looks like one of our composite logins would be resolved
        // by `files` first and receive the engineer's keys from the AuthorizedKeysCommand.
        for (lname, _) in &db.users {
            if let Ok(crate::login::Login::Composite(l)) = crate::login::Login::parse(lname) {
                if let Some(e) = raw.iter().find(|e| *e.name.get_ref() == l.engineer) {
                    ctx.err(&e.name, format!("the local user {lname:?} looks like a login of engineer {:?}; remove or rename it", l.engineer));
                }
            }
        }
    }
    out
}

fn check_pattern(p: &str) -> Result<(), String> {
    let Some((account, host)) = p.split_once('@') else {
        return Err(format!(
            "account pattern {p:?} must look like \"account@host\" (`*` allowed)"
        ));
    };
    if account.is_empty() || host.is_empty() || host.contains('@') {
        return Err(format!(
            "account pattern {p:?} must look like \"account@host\" (`*` allowed)"
        ));
    }
    if let Some(c) = account
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-*".contains(*c)))
    {
        return Err(format!(
            "account pattern {p:?}: {c:?} is not allowed in the account part"
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".-*".contains(*c)))
    {
        return Err(format!(
            "account pattern {p:?}: {c:?} is not allowed in the host part"
        ));
    }
    Ok(())
}

fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(ipnet::IpNet::from(addr));
    }
    let net: ipnet::IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not an address or a CIDR network like \"10.0.0.0/8\""))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean \"{}\"?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn check_grants(
    ctx: &mut Ctx,
    raw: &[RawGrant],
    hosts: &[Host],
    engineers: &[Engineer],
) -> Vec<GrantRule> {
    let mut out = Vec::with_capacity(raw.len());
    // Indexes, so that a large inventory (thousands of grants) validates in linear time.
    let engineer_names: HashSet<&str> = engineers.iter().map(|e| e.name.as_str()).collect();
    let group_names: HashSet<&str> = engineers
        .iter()
        .flat_map(|e| e.groups.iter().map(String::as_str))
        .collect();
    let host_accounts: HashSet<(&str, &str)> = hosts
        .iter()
        .flat_map(|h| {
            h.accounts
                .iter()
                .map(|a| (a.name.as_str(), h.name.as_str()))
        })
        .collect();
    for g in raw {
        let line = ctx.line_of(g.accounts.span().start);
        let mut rule = GrantRule {
            engineers: vec![],
            groups: vec![],
            accounts: vec![],
            from: vec![],
            not_before: None,
            not_after: None,
            line,
        };
        for e in g
            .engineers
            .as_ref()
            .map(|v| v.get_ref().as_slice())
            .unwrap_or_default()
        {
            if !engineer_names.contains(e.get_ref().as_str()) {
                ctx.err(
                    e,
                    format!(
                        "grant: unknown engineer {:?} (no [[engineer]] with that name)",
                        e.get_ref()
                    ),
                );
            }
            rule.engineers.push(e.get_ref().clone());
        }
        for gr in g
            .groups
            .as_ref()
            .map(|v| v.get_ref().as_slice())
            .unwrap_or_default()
        {
            if !group_names.contains(gr.get_ref().as_str()) {
                ctx.err(
                    gr,
                    format!(
                        "grant: unknown group {:?} (no engineer is in it)",
                        gr.get_ref()
                    ),
                );
            }
            rule.groups.push(gr.get_ref().clone());
        }
        if rule.engineers.is_empty() && rule.groups.is_empty() {
            ctx.err_at(
                Some(line),
                "grant needs `engineers` or `groups` (who gets it)".into(),
            );
        }
        if g.accounts.get_ref().is_empty() {
            ctx.err(
                &g.accounts,
                "grant: `accounts` is empty; list \"account@host\" patterns".into(),
            );
        }
        for p in g.accounts.get_ref() {
            let pat = p.get_ref();
            if let Err(e) = check_pattern(pat) {
                ctx.err(p, format!("grant: {e}"));
                continue;
            }
            let matched = match pat.split_once('@') {
                Some((account, host)) if !pat.contains('*') => {
                    host_accounts.contains(&(account, host))
                }
                _ => host_accounts
                    .iter()
                    .any(|(account, host)| pattern_matches(pat, account, host)),
            };
            if !matched {
                if pat.contains('*') {
                    ctx.warn(p, format!("grant: pattern {pat:?} matches no host account"));
                } else {
                    ctx.err(p, format!("grant: {pat:?} is not a host account (no [[host]] {:?} with [[host.account]] {:?})", pat.split('@').nth(1).unwrap_or_default(), pat.split('@').next().unwrap_or_default()));
                }
            }
            rule.accounts.push(pat.clone());
        }
        if let Some(from) = &g.from {
            if from.get_ref().is_empty() {
                ctx.err(
                    from,
                    "grant: `from` is empty; omit it to allow any source address".into(),
                );
            }
            for c in from.get_ref() {
                match parse_cidr(c.get_ref()) {
                    Ok(net) => rule.from.push(net),
                    Err(e) => ctx.err(c, format!("grant: from: {e}")),
                }
            }
        }
        let mut time = |v: &Option<Spanned<String>>, what: &str| -> Option<SystemTime> {
            let v = v.as_ref()?;
            match parse_rfc3339_utc(v.get_ref()) {
                Ok(t) => Some(t),
                Err(e) => {
                    ctx.err(v, format!("grant: {what}: {e}"));
                    None
                }
            }
        };
        rule.not_before = time(&g.not_before, "not_before");
        rule.not_after = time(&g.not_after, "not_after");
        if let (Some(nb), Some(na), Some(span)) =
            (rule.not_before, rule.not_after, g.not_after.as_ref())
        {
            if nb >= na {
                ctx.err(
                    span,
                    "grant: not_after must be later than not_before".into(),
                );
            }
        }
        out.push(rule);
    }
    out
}
