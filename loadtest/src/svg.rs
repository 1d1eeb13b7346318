//! The plot: three panels on one time axis, so a cold start can be seen. Latency of each request
//! by send time (log scale), requests in flight and held, and ready backends, with the wake and
//! ready events as vertical lines through all three.
//!
//! Written directly as SVG: the layout is fixed, and a plotting library would bring a font
//! rasteriser to measure labels the browser lays out anyway.

use std::fmt::Write as _;

use crate::report::Report;

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const MAX_POINTS: usize = 20_000;

/// A panel's vertical extent.
struct Panel {
    top: f64,
    height: f64,
}

impl Panel {
    fn bottom(&self) -> f64 {
        self.top + self.height
    }
}

/// A step of 1, 2 or 5 times a power of ten giving about `ticks` ticks over `range`.
fn nice_step(range: f64, ticks: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / ticks;
    let power = 10f64.powf(raw.log10().floor());
    let unit = raw / power;
    let nice = if unit < 1.5 {
        1.0
    } else if unit < 3.5 {
        2.0
    } else if unit < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * power
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the report's timeline as an SVG document.
pub fn render(report: &Report) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let latency = Panel {
        top: 50.0,
        height: 300.0,
    };
    let state = Panel {
        top: 390.0,
        height: 160.0,
    };
    let ready = Panel {
        top: 590.0,
        height: 90.0,
    };
    let height = ready.bottom() + 50.0;

    let end_us = report
        .records
        .iter()
        .map(|r| r.sent_us + r.latency_us)
        .chain(report.samples.iter().map(|s| s.at_us))
        .chain(std::iter::once(report.duration_us))
        .max()
        .unwrap_or(1)
        .max(1);
    let end_s = end_us as f64 / 1e6;
    let x = |us: f64| LEFT + (us / 1e6) / end_s * plot_w;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "wakegate-loadtest {} - {} (Host: {}){}",
        report.mode,
        report.url,
        report.host,
        if report.interrupted {
            " - interrupted"
        } else {
            ""
        }
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="40" fill="#555">{} requests, {} ok, p50 {:.2} ms, p99 {:.2} ms. Dashed: wake (orange), backend ready (green).</text>"##,
        report.requests.sent,
        report.requests.ok,
        report.latency.p50 as f64 / 1000.0,
        report.latency.p99 as f64 / 1000.0
    );

    // Time grid and labels under each panel.
    let step = nice_step(end_s, 10.0);
    for panel in [&latency, &state, &ready] {
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{}" fill="none" stroke="#999"/>"##,
            panel.top, panel.height
        );
        let mut t = 0.0;
        while t <= end_s + 1e-9 {
            let px = x(t * 1e6);
            let _ = writeln!(
                svg,
                r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
                panel.top,
                panel.bottom(),
                panel.bottom() + 14.0,
                trim_float(t)
            );
            t += step;
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">time since start (s)</text>"##,
        LEFT + plot_w / 2.0,
        ready.bottom() + 34.0
    );

    // Latency panel, log scale from 0.1 ms to the largest latency.
    let max_ms = report
        .records
        .iter()
        .map(|r| r.latency_us as f64 / 1000.0)
        .fold(1.0f64, f64::max);
    let (lo, hi) = (-1.0f64, max_ms.log10().ceil().max(0.0));
    let y_lat = |ms: f64| {
        let v = ms.max(0.1).log10();
        latency.bottom() - (v - lo) / (hi - lo) * latency.height
    };
    let mut decade = lo;
    while decade <= hi {
        let py = y_lat(10f64.powf(decade));
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{} ms</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0,
            trim_float(10f64.powf(decade))
        );
        decade += 1.0;
    }
    axis_title(&mut svg, &latency, "latency (first byte)");
    let every = report.records.len().div_ceil(MAX_POINTS).max(1);
    for (i, r) in report.records.iter().enumerate() {
        let ok = (200..400).contains(&r.status);
        // Thin out the successes of a long run; keep every failure.
        if ok && i % every != 0 {
            continue;
        }
        let color = if ok { "#2a9d8f" } else { "#e63946" };
        let _ = writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}" fill-opacity="0.7"/>"#,
            x(r.sent_us as f64),
            y_lat(r.latency_us as f64 / 1000.0)
        );
    }

    // In flight and held.
    let max_state = report
        .samples
        .iter()
        .map(|s| s.in_flight.max(s.held))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let y_state = |v: f64| state.bottom() - v / max_state * state.height;
    value_ticks(&mut svg, max_state, &y_state, plot_w);
    axis_title(&mut svg, &state, "requests");
    // In flight is drawn wide underneath, so held (often equal at a cold start) shows on top.
    let in_flight: fn(&crate::record::StateSample) -> u64 = |s| s.in_flight;
    let held: fn(&crate::record::StateSample) -> u64 = |s| s.held;
    for (color, label, width, pick) in [
        ("#457b9d", "in flight", 3.5, in_flight),
        ("#f4a261", "held", 1.5, held),
    ] {
        let points: Vec<String> = report
            .samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.at_us as f64), y_state(pick(s) as f64)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}"/>"#,
            points.join(" ")
        );
        let lx = if label == "held" { 110.0 } else { 10.0 };
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{color}">{label}</text>"#,
            LEFT + lx,
            state.top + 14.0
        );
    }

    // Ready backends, as steps.
    let max_ready = report
        .samples
        .iter()
        .map(|s| s.ready)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let y_ready = |v: f64| ready.bottom() - v / max_ready * ready.height;
    value_ticks(&mut svg, max_ready, &y_ready, plot_w);
    axis_title(&mut svg, &ready, "ready backends");
    let mut steps = Vec::new();
    let mut last: Option<u64> = None;
    for s in &report.samples {
        if let Some(prev) = last {
            steps.push(format!(
                "{:.1},{:.1}",
                x(s.at_us as f64),
                y_ready(prev as f64)
            ));
        }
        steps.push(format!(
            "{:.1},{:.1}",
            x(s.at_us as f64),
            y_ready(s.ready as f64)
        ));
        last = Some(s.ready);
    }
    let _ = writeln!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="#6a4c93" stroke-width="1.5"/>"##,
        steps.join(" ")
    );

    // Wake and ready events through all panels.
    for e in &report.events {
        if e.at_us < 0 || e.at_us as u64 > end_us {
            continue;
        }
        let color = if e.kind == "wake" {
            "#f4a261"
        } else {
            "#2a9d8f"
        };
        let px = x(e.at_us as f64);
        let _ = writeln!(
            svg,
            r#"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="{color}" stroke-dasharray="4 3"/>"#,
            latency.top,
            ready.bottom()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn axis_title(svg: &mut String, panel: &Panel, title: &str) {
    let cy = panel.top + panel.height / 2.0;
    let _ = writeln!(
        svg,
        r##"<text x="16" y="{cy:.1}" transform="rotate(-90 16 {cy:.1})" text-anchor="middle" fill="#333">{}</text>"##,
        escape(title)
    );
}

fn value_ticks(svg: &mut String, max: f64, y: &dyn Fn(f64) -> f64, plot_w: f64) {
    let step = nice_step(max, 4.0).max(1.0);
    let mut v = 0.0;
    while v <= max + 1e-9 {
        let py = y(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0,
            trim_float(v)
        );
        v += step;
    }
}

/// `2`, `0.5`, `0.25`: no trailing zeros.
fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Event, RequestRecord, StateSample};

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(23.0, 10.0), 2.0);
        assert_eq!(nice_step(0.9, 10.0), 0.1);
        assert_eq!(trim_float(0.5), "0.5");
        assert_eq!(trim_float(2.0), "2");
    }

    #[test]
    fn a_cold_start_plot_has_points_lines_and_events() {
        let report = Report {
            mode: "cold-start",
            url: "http://127.0.0.1:8080/".into(),
            host: "a<b".into(),
            duration_us: 2_000_000,
            records: vec![
                RequestRecord {
                    sent_us: 0,
                    latency_us: 1_000_000,
                    total_us: 1_000_100,
                    status: 200,
                    cold: true,
                    iteration: 1,
                },
                RequestRecord {
                    sent_us: 1_500_000,
                    latency_us: 800,
                    total_us: 900,
                    status: 502,
                    cold: false,
                    iteration: 1,
                },
            ],
            samples: vec![
                StateSample {
                    at_us: 0,
                    in_flight: 1,
                    held: 1,
                    ready: 0,
                },
                StateSample {
                    at_us: 1_000_000,
                    in_flight: 0,
                    held: 0,
                    ready: 1,
                },
            ],
            events: vec![
                Event {
                    kind: "wake".into(),
                    route: "r".into(),
                    at_us: 500,
                },
                Event {
                    kind: "ready".into(),
                    route: "r".into(),
                    at_us: 999_000,
                },
            ],
            ..Report::default()
        };
        let svg = render(&report);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("#e63946"), "the failure is red");
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert!(svg.contains("a&lt;b"), "text is escaped");
    }
}
