//! The evaluation report: one self-contained HTML page (no network at view time) with the
//! table of `cargo xtask eval` and a chart per metric across bundles — accuracy per hop class,
//! hallucination rate, memory, energy per query, perplexity — the way the study behind kiln
//! shows its compressed variants side by side. Charts are SVG drawn by `plotters`, inline.
//!
//! A small inline script measures what the browser laid out (the bars' rendered boxes) and
//! writes it into `#rendered`, so a test can check the page as a browser shows it.

use plotters::prelude::*;

use crate::evaluate::Row;

/// Colors of the series, in order.
const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];

/// One series of a bar chart: a value per bundle (missing values draw no bar) and optional
/// interval ends.
struct Series<'a> {
    name: &'a str,
    values: Vec<Option<f64>>,
    intervals: Vec<Option<(f64, f64)>>,
}

/// A grouped bar chart as an SVG string.
fn bar_chart(id: &str, title: &str, y_label: &str, labels: &[String], series: &[Series]) -> String {
    let n = labels.len().max(1);
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied().chain(s.intervals.iter().flatten().map(|i| i.1)))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (200 + 140 * n as u32, 360)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc(y_label)
                .x_labels(2 * n + 1) // steps of 0.5: the bars' centers are among them
                .x_label_formatter(&|x| {
                    let i = (*x - 0.5).round();
                    if i >= 0.0 && (i as usize) < labels.len() && (*x - 0.5 - i).abs() < 1e-6 {
                        labels[i as usize].clone()
                    } else {
                        String::new()
                    }
                })
                .draw()?;
            let k = series.len().max(1) as f64;
            let width = 0.8 / k;
            for (j, s) in series.iter().enumerate() {
                let color = COLORS[j % COLORS.len()];
                let bars = s.values.iter().enumerate().filter_map(|(i, v)| {
                    let x0 = i as f64 + 0.1 + j as f64 * width;
                    v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled()))
                });
                chart
                    .draw_series(bars)?
                    .label(s.name)
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
                let whiskers = s.intervals.iter().enumerate().filter_map(|(i, iv)| {
                    let x = i as f64 + 0.1 + (j as f64 + 0.45) * width;
                    iv.map(|(lo, hi)| PathElement::new(vec![(x, lo), (x, hi)], BLACK.stroke_width(2)))
                });
                chart.draw_series(whiskers)?;
            }
            if series.len() > 1 {
                chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            }
            root.present()?;
            Ok(())
        };
        if let Err(e) = draw() {
            return format!("<p>chart {title} could not be drawn: {}</p>", escape(&e.to_string()));
        }
    }
    // The chart's own id, so the page's check and a reader can find it.
    svg.replacen("<svg ", &format!("<svg id=\"{id}\" class=\"chart\" "), 1)
}

/// `text` safe inside HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The report page for `rows`.
pub fn html(rows: &[Row]) -> String {
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let mib = |b: u64| b as f64 / 1048576.0;
    let acc = |class: &str| Series {
        name: match class {
            "single_hop" => "single-hop",
            "multi_hop" => "multi-hop",
            _ => "all",
        },
        values: rows.iter().map(|r| r.accuracy(class).map(|a| 100.0 * a.0)).collect(),
        intervals: rows.iter().map(|r| r.accuracy(class).map(|a| (100.0 * a.1, 100.0 * a.2))).collect(),
    };
    let plain = |name, values: Vec<Option<f64>>| Series { name, intervals: vec![None; values.len()], values };
    let energy_how: Vec<&str> = rows.iter().filter_map(|r| r.energy.as_ref().map(|e| e.how)).collect();
    let energy_title = if energy_how.is_empty() {
        "Energy per query".to_string()
    } else if energy_how.iter().all(|h| *h == "measured") {
        "Energy per query (measured)".to_string()
    } else if energy_how.iter().all(|h| *h == "modeled") {
        "Energy per query (modeled)".to_string()
    } else {
        "Energy per query (measured or modeled: see the table)".to_string()
    };
    let charts = [
        bar_chart(
            "chart-accuracy",
            "Question answering accuracy (95 % Wilson interval)",
            "accuracy, %",
            &labels,
            &[acc("single_hop"), acc("multi_hop"), acc("all")],
        ),
        bar_chart(
            "chart-hallucination",
            "Hallucination rate (SelfCheckGPT unigram)",
            "%",
            &labels,
            &[
                plain("sentences flagged", rows.iter().map(|r| r.hallucination_rate().map(|x| 100.0 * x)).collect()),
                plain(
                    "mean normalized Avg score x 100",
                    rows.iter()
                        .map(|r| r.figures["hallucination"]["mean_normalized"].as_f64().map(|x| 100.0 * x))
                        .collect(),
                ),
            ],
        ),
        bar_chart(
            "chart-memory",
            "Memory",
            "MiB",
            &labels,
            &[
                plain("weights", rows.iter().map(|r| Some(mib(r.footprint.weights_bytes))).collect()),
                plain("KV cache at context", rows.iter().map(|r| Some(mib(r.footprint.kv_bytes))).collect()),
                plain("peak resident (measured)", rows.iter().map(|r| r.peak_rss_bytes.map(mib)).collect()),
            ],
        ),
        bar_chart(
            "chart-energy",
            &energy_title,
            "joules per query",
            &labels,
            &[plain("energy", rows.iter().map(|r| r.energy.as_ref().map(|e| e.joules)).collect())],
        ),
        bar_chart(
            "chart-perplexity",
            "Perplexity (llama.cpp's rule)",
            "perplexity",
            &labels,
            &[plain("perplexity", rows.iter().map(Row::perplexity).collect())],
        ),
    ];
    let mut details = String::new();
    for r in rows {
        let e = r.energy.as_ref().map_or("not run".to_string(), |e| {
            format!(
                "{} J per query, {} ({}); a query: {:.1} prompt tokens, {:.1} generated",
                crate::evaluate::joules(e.joules),
                e.how,
                e.detail,
                e.query.prompt_tokens,
                e.query.generated_tokens
            )
        });
        details += &format!(
            "<li><b>{}</b> ({}): {} parameters, {:.2} bits per weight; energy {}</li>\n",
            escape(&r.label),
            escape(&r.bundle.display().to_string()),
            r.footprint.parameters,
            r.footprint.bits_per_weight(),
            escape(&e)
        );
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kiln evaluation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
</style></head>
<body>
<h1>kiln evaluation report</h1>
<p>{n} bundle(s). Accuracy: a response is correct when it contains an accepted answer after
normalization. Hallucination: SelfCheckGPT's unigram variant with the model's own samples.
Energy is labelled measured (RAPL) or modeled (device profile: DRAM energy per byte read plus
energy per operation).</p>
<pre>{table}</pre>
<ul>
{details}</ul>
<div class="charts">
{charts}
</div>
<p id="rendered">not checked</p>
<script>
// What the browser laid out: charts, and bars with a non-empty rendered box.
(function () {{
  var charts = document.querySelectorAll('svg.chart');
  var bars = 0;
  charts.forEach(function (svg) {{
    svg.querySelectorAll('rect').forEach(function (r) {{
      var b = r.getBBox();
      if (b.width > 0 && b.height > 0) bars++;
    }});
  }});
  document.getElementById('rendered').textContent = 'charts=' + charts.length + ' drawn-rects=' + bars;
}})();
</script>
</body></html>
"#,
        n = rows.len(),
        table = escape(&crate::evaluate::table(rows)),
        details = details,
        charts = charts.join("\n"),
    )
}
