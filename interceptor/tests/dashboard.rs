//! The admin server's `/dashboard`, rendered by a real browser: headless Chromium (Debian's
//! `chromium`, installed by CI's own script), driven over the DevTools protocol. Its DOM shows
//! the routes and their live state through a cold start, and a screenshot is written to
//! `<target>/tmp/dashboard.png`.
//!
//! Without Chromium the browser test says so and passes, unless `WAKEGATE_REQUIRE_BROWSER=1`
//! (CI sets it) makes a missing browser a failure.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    _child: tokio::process::Child,
    page: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|bin| {
            std::process::Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

impl Browser {
    /// Starts Chromium, or `None` (with a note) when there is none and none is required.
    async fn launch() -> Option<Self> {
        let Some(bin) = chromium() else {
            assert!(
                std::env::var("WAKEGATE_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "WAKEGATE_REQUIRE_BROWSER=1 but no chromium found (apt-get install chromium, or run .ci/browser.sh)"
            );
            eprintln!(
                "skipping the browser check: no chromium found (install it with .ci/browser.sh)"
            );
            return None;
        };
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1200,760",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited without a DevTools address");
        })
        .await
        .expect("chromium's DevTools address within 30 s");
        // Keep reading its stderr, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port = browser_ws
            .trim_start_matches("ws://127.0.0.1:")
            .split('/')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        let http = Http::default();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        let page_ws = loop {
            let targets: Value = match http.get(addr, "127.0.0.1", "/json/list").await {
                Ok(list) => serde_json::from_slice(&list.body).unwrap_or_default(),
                Err(_) => Value::Null,
            };
            let page = targets
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_owned);
            if let Some(page) = page {
                // Its address may name `localhost`; the browser listens on 127.0.0.1 only.
                let path = page.splitn(4, '/').nth(3).unwrap_or_default().to_owned();
                break format!("ws://127.0.0.1:{port}/{path}");
            }
            assert!(
                tokio::time::Instant::now() < until,
                "chromium lists no page: {targets}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (page, _) = tokio_tungstenite::connect_async(page_ws).await.unwrap();
        let mut this = Self {
            _child: child,
            page,
            next_id: 0,
            _profile: profile,
        };
        this.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1200, "height": 760, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        Some(this)
    }

    /// Calls a DevTools method and returns its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::text(msg)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let msg = self.page.next().await.unwrap().unwrap();
                let Message::Text(text) = msg else { continue };
                let reply: Value = serde_json::from_str(&text).unwrap();
                if reply["id"] == id {
                    assert!(reply.get("error").is_none(), "{method}: {reply}");
                    return reply["result"].clone();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} answered within 30 s"))
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Waits until `expression` evaluates to `want`, under a deadline.
    async fn wait_for(&mut self, what: &str, expression: &str, want: Value) {
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.eval(expression).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "timed out waiting for {what}: {expression} = {got}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn field(route: &str, field: &str) -> String {
    format!(
        r#"document.querySelector('tr[data-route="{route}"] [data-field="{field}"]')?.textContent ?? null"#
    )
}

fn route_state(route: &str) -> String {
    format!(r#"document.querySelector('tr[data-route="{route}"]')?.dataset.state ?? null"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_cold_start_live_in_a_real_browser() {
    let Some(mut browser) = Browser::launch().await else {
        return;
    };
    let warm = Upstream::start("api", Duration::ZERO).await;
    let gate = tempfile::tempdir().unwrap();
    let gate = gate.path().join("open");
    let port = free_port_below_ephemeral();
    let config = format!(
        "routes:\n  - name: api\n    hosts: [\"api.test\"]\n    target: {{ upstream: \"{}\" }}\n{}",
        warm.addr,
        gated_backend_route("app", "app.test", port, &gate, "")
    );
    let ic = Interceptor::start(&config).await;
    browser
        .call(
            "Page.navigate",
            json!({"url": format!("http://{}/dashboard", ic.admin)}),
        )
        .await;
    browser
        .wait_for(
            "the event stream",
            "document.getElementById('live')?.textContent ?? null",
            json!("live"),
        )
        .await;
    browser
        .wait_for("app cold", &route_state("app"), json!("cold"))
        .await;
    browser
        .wait_for("api ready", &route_state("api"), json!("ready"))
        .await;
    assert_eq!(browser.eval(&field("api", "ready")).await, json!("1"));
    assert_eq!(browser.eval(&field("app", "ready")).await, json!("0"));
    assert_eq!(browser.eval(&field("app", "last")).await, json!("-"));

    // A request at zero: the route is waking, with one request held and in flight.
    let held = ic.spawn_get("app.test", "/");
    ic.wait_concurrency("app", 1).await;
    browser
        .wait_for("app waking", &route_state("app"), json!("waking"))
        .await;
    browser
        .wait_for("one held", &field("app", "held"), json!("1"))
        .await;
    assert_eq!(browser.eval(&field("app", "inflight")).await, json!("1"));
    browser
        .wait_for(
            "a waking bar",
            r#"document.querySelector('g[data-wake="app"]')?.dataset.done ?? null"#,
            json!("false"),
        )
        .await;

    // The backend comes up: the request is served, the route is ready, and the wake's phases
    // are shown.
    std::fs::write(&gate, b"").unwrap();
    let reply = held.await.unwrap().unwrap();
    assert_eq!(reply.status, 200);
    browser
        .wait_for("app ready", &route_state("app"), json!("ready"))
        .await;
    browser
        .wait_for("app's endpoint", &field("app", "ready"), json!("1"))
        .await;
    browser
        .wait_for(
            "the wake served",
            r#"document.querySelector('g[data-wake="app"]')?.dataset.done ?? null"#,
            json!("true"),
        )
        .await;
    let last = browser.eval(&field("app", "last")).await;
    let last = last.as_str().unwrap();
    assert!(
        last.starts_with("held \u{2192} ready ") && last.contains("first byte +"),
        "{last}"
    );
    browser
        .wait_for(
            "one cold start",
            "document.getElementById('count-cold').textContent",
            json!("1"),
        )
        .await;
    assert_eq!(browser.eval(&field("app", "held")).await, json!("0"));

    // Traffic shows as requests per second.
    for _ in 0..20 {
        assert_eq!(ic.get("api.test", "/").await.status, 200);
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rps = browser.eval(&field("api", "rps")).await;
        if rps
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "api req/s stayed {rps}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let shot = browser
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    println!("dashboard screenshot: {}", path.display());
}

/// The page and its script come from the binary, locked to the admin origin.
#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_with_a_strict_policy() {
    let up = Upstream::start("any", Duration::ZERO).await;
    let config = format!(
        "routes:\n  - name: any\n    target: {{ upstream: \"{}\" }}\n",
        up.addr
    );
    let ic = Interceptor::start(&config).await;
    let page = ic.admin_get("/dashboard").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(page.text().contains(r#"<script src="/dashboard.js">"#));
    assert!(
        !page.text().contains("http://") && !page.text().contains("https://"),
        "no CDN"
    );
    let script = ic.admin_get("/dashboard.js").await;
    assert_eq!(script.status, 200);
    assert_eq!(
        script.headers["content-type"],
        "text/javascript; charset=utf-8"
    );
    for endpoint in ["\"/status\"", "\"/metrics\"", "\"/events\""] {
        assert!(script.text().contains(endpoint), "reads {endpoint}");
    }
    assert!(
        !script.text().contains("innerHTML"),
        "built with textContent only"
    );
}
