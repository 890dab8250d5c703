//! Operator commands over the REST API: `list`, `switchover`, `failover`, `history`, `pause`,
//! `resume`. A cluster is addressed with `--api URL`, `--config node.toml` or `--dir DIR`.

use std::time::Duration;

use anyhow::{bail, Context};
use pgkeel_agent::http::{request_with_headers, Auth, Response};
use serde_json::{json, Value};

use crate::{Command, Target};

/// Where to send requests and with which credentials.
struct Api {
    urls: Vec<String>,
    auth: Option<Auth>,
}

fn resolve(t: &Target) -> anyhow::Result<Api> {
    let (urls, user, password) = if let Some(api) = &t.api {
        let urls: Vec<String> =
            api.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        (urls, None, None)
    } else if let Some(path) = &t.config {
        let c = pgkeel_config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        (vec![c.rest_url()], Some(c.rest.username), c.rest.password)
    } else if let Some(dir) = &t.dir {
        let up = crate::up::UpInfo::read(dir)?;
        (up.nodes.iter().map(|n| n.api_url.clone()).collect(), Some(up.api.username), Some(up.api.password))
    } else {
        bail!("say which cluster: --api URL, --config node.toml or --dir DIR (of a pgkeel up cluster)");
    };
    if urls.is_empty() {
        bail!("no REST API URL given");
    }
    let user = t.user.clone().or(user).unwrap_or_else(|| "pgkeel".into());
    let auth = t.password.clone().or(password).map(|password| Auth { username: user, password });
    Ok(Api { urls, auth })
}

impl Api {
    /// Send to the first member that answers.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<Response> {
        self.call_with(method, path, body, &[], timeout).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> anyhow::Result<Response> {
        let mut errors = Vec::new();
        for base in &self.urls {
            match request_with_headers(method, &format!("{base}{path}"), body, self.auth.as_ref(), headers, timeout)
                .await
            {
                Ok(r) => return Ok(r),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("no member answered:\n  {}", errors.join("\n  "))
    }
}

fn fail(r: &Response) -> anyhow::Error {
    let msg = r.json().ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or_else(|| r.text());
    anyhow::anyhow!("{} (HTTP {})", msg.trim(), r.status)
}

const SHORT: Duration = Duration::from_secs(5);
const ACTION: Duration = Duration::from_secs(120);

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List { target, json } => show(&target, "/cluster", json, render_list).await?,
        Command::History { target, json } => show(&target, "/history", json, render_history).await?,
        Command::Switchover { target, to, leader } => {
            let api = resolve(&target)?;
            let r =
                api.call("POST", "/switchover", Some(&json!({ "leader": leader, "candidate": to })), ACTION).await?;
            if r.status != 200 {
                return Err(fail(&r));
            }
            println!("{}", r.json()?["message"].as_str().unwrap_or("switched over"));
        }
        Command::Failover { target, to } => {
            let api = resolve(&target)?;
            let r = api.call("POST", "/failover", Some(&json!({ "candidate": to })), ACTION).await?;
            if r.status != 200 {
                return Err(fail(&r));
            }
            println!("{}", r.json()?["message"].as_str().unwrap_or("failed over"));
        }
        Command::Restart { target, node, all, pending } => restart(&target, node.as_deref(), all, pending).await?,
        Command::Reinit { target, node } => {
            let api = resolve(&target)?;
            let url = member_api(&api, &node).await?;
            let r = request_with_headers(
                "POST",
                &format!("{url}/reinitialize"),
                Some(&json!({})),
                api.auth.as_ref(),
                &[],
                LONG,
            )
            .await?;
            if r.status != 200 {
                return Err(fail(&r));
            }
            println!("{}", r.json()?["message"].as_str().unwrap_or("reinitialized"));
        }
        Command::Reload { target, node } => reload(&target, node.as_deref()).await?,
        Command::Pause { target } => set_pause(&target, true).await?,
        Command::Resume { target } => set_pause(&target, false).await?,
        Command::Agent { .. }
        | Command::Up { .. }
        | Command::Down { .. }
        | Command::Config { .. }
        | Command::Guard { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}

/// GET a JSON document and print it as JSON or through `render`.
async fn show(target: &Target, path: &str, json: bool, render: fn(&Value) -> String) -> anyhow::Result<()> {
    let r = resolve(target)?.call("GET", path, None, SHORT).await?;
    if r.status != 200 {
        return Err(fail(&r));
    }
    let v = r.json()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
    }
    Ok(())
}

const LONG: Duration = Duration::from_secs(600);

/// The REST URL of member `node`, from `/cluster`.
async fn member_api(api: &Api, node: &str) -> anyhow::Result<String> {
    let v = cluster(api).await?;
    v["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == node))
        .and_then(|m| m["api_url"].as_str().map(String::from))
        .with_context(|| format!("{node} is not a live member of the cluster (see pgkeel list)"))
}

async fn cluster(api: &Api) -> anyhow::Result<Value> {
    let r = api.call("GET", "/cluster", None, SHORT).await?;
    if r.status != 200 {
        return Err(fail(&r));
    }
    r.json()
}

/// Restart one member; `Ok(false)` when `pending` was asked and none is pending.
async fn restart_one(api: &Api, node: &str, pending: bool) -> anyhow::Result<bool> {
    let url = member_api(api, node).await?;
    let body = json!({ "restart_pending": pending });
    let r = request_with_headers("POST", &format!("{url}/restart"), Some(&body), api.auth.as_ref(), &[], LONG).await?;
    match r.status {
        200 => {
            println!("{node}: restarted");
            Ok(true)
        }
        412 if pending => {
            println!("{node}: no restart pending, skipped");
            Ok(false)
        }
        _ => Err(fail(&r).context(format!("restart {node}"))),
    }
}

/// `pgkeel reload [NODE]`: `POST /reload` on the member, or on every member (each one's
/// answer is printed; one that fails does not stop the others).
async fn reload(target: &Target, node: Option<&str>) -> anyhow::Result<()> {
    let api = resolve(target)?;
    let members: Vec<(String, String)> = match node {
        Some(n) => vec![(n.to_string(), member_api(&api, n).await?)],
        None => cluster(&api).await?["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| Some((m["name"].as_str()?.to_string(), m["api_url"].as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut failed = Vec::new();
    for (name, url) in &members {
        let answer = request_with_headers("POST", &format!("{url}/reload"), None, api.auth.as_ref(), &[], SHORT).await;
        match answer {
            Ok(r) if r.status == 200 => {
                let message = r.json().ok().and_then(|v| v["message"].as_str().map(String::from));
                println!("{name}: {}", message.as_deref().unwrap_or("node.toml reloaded"));
            }
            Ok(r) => {
                println!("{name}: {:#}", fail(&r));
                failed.push(name.as_str());
            }
            Err(e) => {
                println!("{name}: {e:#}");
                failed.push(name.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!("not reloaded on {}", failed.join(", "));
    }
    Ok(())
}

/// Wait until `node` is the running leader or a streaming replica again.
async fn wait_healthy(api: &Api, node: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + LONG;
    while std::time::Instant::now() < deadline {
        if let Ok(v) = cluster(api).await {
            let ok = v["members"].as_array().is_some_and(|ms| {
                ms.iter().any(|m| {
                    m["name"] == node
                        && (m["state"] == "streaming" || (m["role"] == "leader" && m["state"] == "running"))
                })
            });
            if ok {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{node} did not come back within {LONG:?}")
}

/// `pgkeel restart NODE | --all [--pending]`.
async fn restart(target: &Target, node: Option<&str>, all: bool, pending: bool) -> anyhow::Result<()> {
    let api = resolve(target)?;
    if !all {
        let node = node.context("name the member to restart, or --all")?;
        restart_one(&api, node, pending).await?;
        return Ok(());
    }
    let v = cluster(&api).await?;
    let leader = v["leader"].as_str().context("no leader: a rolling restart needs a healthy cluster")?.to_string();
    let needs = |m: &Value| !pending || m["pending_restart"] == true;
    let members: Vec<Value> = v["members"].as_array().cloned().unwrap_or_default();
    // Replicas first, one at a time, each streaming again before the next.
    for m in members.iter().filter(|m| m["name"] != leader.as_str() && needs(m)) {
        let name = m["name"].as_str().unwrap_or_default();
        if restart_one(&api, name, pending).await? {
            wait_healthy(&api, name).await?;
        }
    }
    // Then the leader: switch over to a replica first, so writes pause only for a switchover.
    if let Some(l) = members.iter().find(|m| m["name"] == leader.as_str()).filter(|m| needs(m)) {
        let name = l["name"].as_str().unwrap_or_default();
        let r = api.call("POST", "/switchover", Some(&json!({ "leader": name })), LONG).await?;
        if r.status != 200 {
            return Err(fail(&r).context("switch over before restarting the leader"));
        }
        println!("{}", r.json()?["message"].as_str().unwrap_or("switched over"));
        wait_healthy(&api, name).await?;
        // Stepping down restarts postgres (clean stop, start as a replica), which often applies
        // the pending change already.
        let still_pending = cluster(&api).await?["members"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["name"] == name && m["pending_restart"] == true));
        if pending && !still_pending {
            println!("{name}: restarted by the switchover");
        } else if restart_one(&api, name, pending).await? {
            wait_healthy(&api, name).await?;
        }
    }
    println!("rolling restart done");
    Ok(())
}

/// The cluster config and its version.
async fn get_config(api: &Api) -> anyhow::Result<(Value, u64)> {
    let r = api.call("GET", "/config", None, SHORT).await?;
    if r.status != 200 {
        return Err(fail(&r));
    }
    let v = r.json()?;
    let version = v["version"].as_u64().context("GET /config answered without a version")?;
    Ok((v["config"].clone(), version))
}

/// `pgkeel config show`.
pub async fn config_show(target: &Target) -> anyhow::Result<()> {
    let (config, version) = get_config(&resolve(target)?).await?;
    println!("# cluster config, version {version}");
    println!("{}", serde_json::to_string_pretty(&config)?);
    Ok(())
}

/// Turn `a.b=value` into a JSON merge patch. The value is JSON when it parses as JSON (numbers,
/// booleans, `null` to remove, quoted strings), else a plain string (`6s`, `16MB`). Under
/// `postgresql.parameters.` the rest is one parameter name, dots included.
fn setting_patch(setting: &str) -> anyhow::Result<Value> {
    let (key, raw) = setting.split_once('=').with_context(|| format!("{setting:?} is not KEY=VALUE (e.g. ttl=6s)"))?;
    let key = key.trim();
    let mut path: Vec<&str> = match key.strip_prefix("postgresql.parameters.") {
        Some(param) => vec!["postgresql", "parameters", param],
        None => key.split('.').collect(),
    };
    if path.iter().any(|p| p.is_empty()) {
        bail!("{key:?} is not a config key (e.g. ttl, loop_wait, postgresql.parameters.work_mem)");
    }
    let mut value: Value = serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.trim().to_string()));
    while let Some(last) = path.pop() {
        value = json!({ last: value });
    }
    Ok(value)
}

fn merge_into(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge_into(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

/// `pgkeel config set KEY=VALUE...`.
pub async fn config_set(target: &Target, settings: &[String]) -> anyhow::Result<()> {
    let api = resolve(target)?;
    let mut patch = json!({});
    for s in settings {
        merge_into(&mut patch, setting_patch(s)?);
    }
    let (_, version) = get_config(&api).await?;
    let r = api.call_with("PATCH", "/config", Some(&patch), &[("if-match", version.to_string())], SHORT).await?;
    if r.status != 200 {
        return Err(fail(&r));
    }
    println!("cluster config updated to version {}", r.json()?["version"]);
    Ok(())
}

/// `pgkeel config edit`.
pub async fn config_edit(target: &Target) -> anyhow::Result<()> {
    let api = resolve(target)?;
    let (config, version) = get_config(&api).await?;
    let before = serde_json::to_string_pretty(&config)? + "\n";
    let file =
        tempfile::Builder::new().prefix("pgkeel-config-").suffix(".json").tempfile().context("create a temp file")?;
    std::fs::write(file.path(), &before)?;
    let editor = std::env::var("VISUAL").or_else(|_| std::env::var("EDITOR")).unwrap_or_else(|_| "vi".into());
    // Through the shell, so EDITOR may carry arguments ("code --wait").
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .with_context(|| format!("run the editor {editor:?}"))?;
    if !status.success() {
        bail!("the editor {editor:?} exited with {status}; nothing changed");
    }
    let after = std::fs::read_to_string(file.path())?;
    if after == before {
        println!("no changes");
        return Ok(());
    }
    let edited: Value = serde_json::from_str(&after).context("the edited config is not valid JSON; nothing changed")?;
    let r = api.call_with("PUT", "/config", Some(&edited), &[("if-match", version.to_string())], SHORT).await?;
    if r.status != 200 {
        return Err(fail(&r).context("nothing changed"));
    }
    println!("cluster config updated to version {}", r.json()?["version"]);
    Ok(())
}

async fn set_pause(target: &Target, pause: bool) -> anyhow::Result<()> {
    let api = resolve(target)?;
    let r = api
        .call("PATCH", "/config", Some(&json!({ "pause": pause })), SHORT)
        .await
        .context("change the cluster config")?;
    if r.status != 200 {
        return Err(fail(&r));
    }
    println!(
        "{}",
        if pause {
            "Cluster paused: no automatic failover, restart or demotion until `pgkeel resume`"
        } else {
            "Cluster resumed"
        }
    );
    Ok(())
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A member's tags that differ from the defaults, e.g. `nofailover,failover_priority=0`.
fn member_tags(tags: &Value) -> String {
    let mut out = Vec::new();
    if tags["nofailover"] == true {
        out.push("nofailover".to_string());
    }
    if let Some(p) = tags["failover_priority"].as_i64().filter(|p| *p != 1) {
        out.push(format!("failover_priority={p}"));
    }
    out.join(",")
}

fn render_list(v: &Value) -> String {
    let mut out = format!(
        "Cluster: {} (leader: {}, term {}){}\n",
        text(&v["cluster"]),
        if v["leader"].is_null() { "none".into() } else { text(&v["leader"]) },
        text(&v["term"]),
        if v["paused"].as_bool() == Some(true) { " [PAUSED: no automatic actions]" } else { "" },
    );
    let rows: Vec<Vec<String>> = v["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let lag = match m["lag"].as_u64() {
                        Some(b) => format!("{b}"),
                        None => "".into(),
                    };
                    let restart = if m["pending_restart"] == true { "*" } else { "" };
                    vec![
                        text(&m["name"]),
                        text(&m["host"]),
                        text(&m["role"]),
                        text(&m["state"]),
                        text(&m["timeline"]),
                        lag,
                        text(&m["term"]),
                        member_tags(&m["tags"]),
                        restart.to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(
        &["Member", "Host", "Role", "State", "TL", "Lag (bytes)", "Term", "Tags", "Pending restart"],
        &rows,
    ));
    if let Some(f) = v["failover"].as_object() {
        out.push_str(&format!(
            "Pending {}: to {}\n",
            text(&f["kind"]),
            if f["candidate"].is_null() { "best candidate".into() } else { text(&f["candidate"]) }
        ));
    }
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let ago = |ms: u64| format!("{}s ago", now_ms.saturating_sub(ms) / 1000);
    if let Some(ms) = v["last_archived_ms"].as_u64() {
        out.push_str(&format!("WAL archive: last file archived {}\n", ago(ms)));
    }
    let b = &v["backup"];
    if let Some(last) = b["last_ok"].as_array() {
        out.push_str(&format!(
            "Last scheduled backup: {} {}\n",
            text(&last[0]),
            last.get(1).and_then(Value::as_u64).map(ago).unwrap_or_default()
        ));
    }
    if b["ok"] == false {
        out.push_str(&format!("Scheduled backup FAILED on {}: {}\n", text(&b["runner"]), text(&b["message"])));
    } else if b.is_object() && b["finished_ms"].is_null() {
        out.push_str(&format!("Scheduled backup running on {}\n", text(&b["runner"])));
    }
    out
}

fn render_history(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let secs = h["time_ms"].as_u64().unwrap_or(0) / 1000;
                    vec![
                        text(&h["term"]),
                        text(&h["timeline"]),
                        pgkeel_config::format_unix_utc(secs),
                        text(&h["reason"]),
                        text(&h["old_primary"]),
                        text(&h["new_primary"]),
                        text(&h["old_primary_lsn"]),
                        text(&h["lsn"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["Term", "TL", "Time (UTC)", "Reason", "Old primary", "New primary", "Old LSN", "New timeline at"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_merge_patches() {
        assert_eq!(setting_patch("ttl=6s").unwrap(), json!({"ttl": "6s"}));
        assert_eq!(setting_patch("loop_wait=1").unwrap(), json!({"loop_wait": 1}));
        assert_eq!(setting_patch("pause=true").unwrap(), json!({"pause": true}));
        assert_eq!(
            setting_patch("postgresql.parameters.pg_stat_statements.max=100").unwrap(),
            json!({"postgresql": {"parameters": {"pg_stat_statements.max": 100}}})
        );
        assert_eq!(
            setting_patch("postgresql.parameters.work_mem=null").unwrap(),
            json!({"postgresql": {"parameters": {"work_mem": null}}})
        );
        assert!(setting_patch("ttl").is_err());
        assert!(setting_patch("a..b=1").is_err());
        let mut p = json!({});
        merge_into(&mut p, setting_patch("postgresql.parameters.a=1").unwrap());
        merge_into(&mut p, setting_patch("postgresql.parameters.b=x").unwrap());
        assert_eq!(p, json!({"postgresql": {"parameters": {"a": 1, "b": "x"}}}));
    }

    #[test]
    fn list_table() {
        let v = json!({"cluster": "c", "leader": "n1", "term": 2, "paused": true, "members": [
            {"name": "n1", "host": "127.0.0.1:5432", "role": "leader", "state": "running", "timeline": 2, "lag": null, "term": 2},
            {"name": "n2", "host": "127.0.0.1:5433", "role": "replica", "state": "streaming", "timeline": 2, "lag": 0, "term": 2,
             "tags": {"nofailover": true, "failover_priority": 0}, "pending_restart": true}]});
        let s = render_list(&v);
        assert!(s.contains("PAUSED"), "{s}");
        assert!(s.lines().nth(1).unwrap().ends_with("Term  Tags                            Pending restart"), "{s}");
        let n2 = s.lines().nth(3).unwrap();
        assert!(n2.starts_with("n2  ") && n2.ends_with("  nofailover,failover_priority=0  *"), "{s}");
    }
}
