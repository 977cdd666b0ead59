//! `tandem history --plot`: candidate and champion metrics across cycles, as SVG or PNG.
//!
//! Both renderers draw the same [`Chart`]; the PNG one rasterises it itself (lines, markers and a
//! 3×5 pixel font) so no font files or drawing libraries are needed.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tandem_retrain::{CycleRecord, Outcome};

const W: usize = 900;
const H: usize = 480;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// Series drawn: (metric, whose, colour).
const SERIES: [(&str, bool, [u8; 3]); 5] = [
    ("recall@50", true, [31, 119, 180]),
    ("recall@50", false, [148, 190, 220]),
    ("recall@10", true, [44, 160, 44]),
    ("ndcg@10", true, [148, 103, 189]),
    ("coverage@10", true, [140, 86, 75]),
];

fn outcome_colour(o: Outcome) -> [u8; 3] {
    match o {
        Outcome::Deployed | Outcome::Published => [44, 160, 44],
        Outcome::Rejected => [214, 39, 40],
        Outcome::RolledBack => [255, 127, 14],
        _ => [127, 127, 127],
    }
}

struct Chart {
    /// Cycles that have candidate metrics.
    cycles: Vec<CycleRecord>,
    ymax: f64,
}

impl Chart {
    fn new(all: &[CycleRecord]) -> Result<Self> {
        let cycles: Vec<CycleRecord> = all
            .iter()
            .filter(|c| !c.candidate_metrics.is_empty())
            .cloned()
            .collect();
        if cycles.is_empty() {
            bail!("no cycle with metrics to plot yet");
        }
        let mut ymax: f64 = 0.1;
        for c in &cycles {
            for (m, cand, _) in SERIES {
                let src = if cand {
                    &c.candidate_metrics
                } else {
                    &c.champion_metrics
                };
                if let Some(v) = src.get(m).filter(|v| v.is_finite()) {
                    ymax = ymax.max(*v);
                }
            }
        }
        Ok(Chart {
            cycles,
            ymax: (ymax * 10.0).ceil() / 10.0,
        })
    }

    fn x(&self, i: usize) -> f64 {
        let n = self.cycles.len();
        let span = W as f64 - LEFT - RIGHT;
        if n == 1 {
            LEFT + span / 2.0
        } else {
            LEFT + span * i as f64 / (n - 1) as f64
        }
    }

    fn y(&self, v: f64) -> f64 {
        H as f64 - BOTTOM - (H as f64 - TOP - BOTTOM) * (v / self.ymax)
    }

    fn label(c: &CycleRecord) -> String {
        match &c.version {
            Some(v) => format!("{} {v}", c.cycle),
            None => format!("{}", c.cycle),
        }
    }

    /// Polyline points of one series (gaps where a cycle lacks the value).
    fn points(&self, metric: &str, candidate: bool) -> Vec<(f64, f64)> {
        self.cycles
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let src = if candidate {
                    &c.candidate_metrics
                } else {
                    &c.champion_metrics
                };
                src.get(metric)
                    .filter(|v| v.is_finite())
                    .map(|&v| (self.x(i), self.y(v)))
            })
            .collect()
    }
}

/// The polyline to draw for `pts`: a single cycle gets a short level segment through its point,
/// so the series' stroke (solid candidate, dashed champion) shows with one cycle too.
fn stroke(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    match pts {
        [(x, y)] => vec![(x - 30.0, *y), (x + 30.0, *y)],
        _ => pts.to_vec(),
    }
}

/// The y axis' title (both formats).
const Y_TITLE: &str = "metric on the held-out slice";
/// The x axis' title (both formats).
const X_TITLE: &str = "cycle and version (marker: outcome)";

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn svg(ch: &Chart) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"22\" font-size=\"15\">Retrain cycles: candidate vs champion on each cycle's held-out slice</text>\n"
    );
    for t in 0..=5 {
        let v = ch.ymax * t as f64 / 5.0;
        let y = ch.y(v);
        s += &format!(
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            W as f64 - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for (i, c) in ch.cycles.iter().enumerate() {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text><circle cx=\"{:.1}\" cy=\"{}\" r=\"5\" fill=\"{}\"><title>{}</title></circle>\n",
            ch.x(i),
            H as f64 - BOTTOM + 18.0,
            Chart::label(c),
            ch.x(i),
            H as f64 - BOTTOM + 32.0,
            hex(outcome_colour(c.outcome)),
            c.outcome.as_str()
        );
    }
    for (k, (m, cand, col)) in SERIES.iter().enumerate() {
        let pts = ch.points(m, *cand);
        let path: Vec<String> = stroke(&pts)
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let dash = if *cand {
            ""
        } else {
            " stroke-dasharray=\"6 4\""
        };
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\n",
            path.join(" "),
            hex(*col)
        );
        for (x, y) in &pts {
            s += &format!(
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{}\"/>\n",
                hex(*col)
            );
        }
        let ly = TOP + 20.0 * k as f64;
        let lx = W as f64 - RIGHT + 15.0;
        s += &format!(
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{} {m}</text>\n",
            lx + 20.0,
            hex(*col),
            lx + 26.0,
            ly + 4.0,
            if *cand { "candidate" } else { "champion" }
        );
    }
    let ly = TOP + 20.0 * SERIES.len() as f64 + 10.0;
    for (k, o) in [Outcome::Deployed, Outcome::Rejected, Outcome::RolledBack]
        .into_iter()
        .enumerate()
    {
        let y = ly + 18.0 * k as f64;
        s += &format!(
            "<circle cx=\"{}\" cy=\"{y}\" r=\"5\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            W as f64 - RIGHT + 25.0,
            hex(outcome_colour(o)),
            W as f64 - RIGHT + 41.0,
            y + 4.0,
            o.as_str()
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{X_TITLE}</text>\n<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{Y_TITLE}</text>\n</svg>\n",
        (LEFT + W as f64 - RIGHT) / 2.0,
        H - 6,
        (TOP + H as f64 - BOTTOM) / 2.0
    );
    s
}

/// A tiny RGB canvas.
struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let o = (y as usize * W + x as usize) * 3;
            self.px[o..o + 3].copy_from_slice(&c);
        }
    }

    fn dot(&mut self, x: f64, y: f64, r: i64, c: [u8; 3]) {
        for dy in -r..=r {
            for dx in -r..=r {
                if dx * dx + dy * dy <= r * r {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }

    /// A line of width ~2, dashed when `dash` (pixels on, pixels off) is non-zero.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], dash: usize) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            if dash > 0 && (i / dash) % 2 == 1 {
                continue;
            }
            let t = i as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            self.set(x.round() as i64, y.round() as i64, c);
            self.set(x.round() as i64, y.round() as i64 + 1, c);
        }
    }

    /// Text in the 3×5 font at scale 2, left-aligned at (x, y) = top-left.
    fn text(&mut self, x: f64, y: f64, s: &str, c: [u8; 3]) {
        let mut cx = x.round() as i64;
        for ch in s.chars() {
            let g = glyph(ch.to_ascii_lowercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for sy in 0..2 {
                            for sx in 0..2 {
                                self.set(cx + col * 2 + sx, y as i64 + row as i64 * 2 + sy, c);
                            }
                        }
                    }
                }
            }
            cx += 8;
        }
    }
}

/// 3×5 glyphs, one row per entry, high bit leftmost. Unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '@' => [2, 5, 7, 4, 3],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        _ => [0; 5],
    }
}

fn png(ch: &Chart) -> Result<Vec<u8>> {
    let mut cv = Canvas::new();
    let grey = [210, 210, 210];
    let black = [30, 30, 30];
    cv.text(LEFT, 10.0, "retrain cycles: candidate vs champion", black);
    for t in 0..=5 {
        let v = ch.ymax * t as f64 / 5.0;
        let y = ch.y(v);
        cv.line((LEFT, y), (W as f64 - RIGHT, y), grey, 0);
        cv.text(LEFT - 40.0, y - 5.0, &format!("{v:.2}"), black);
    }
    for (i, c) in ch.cycles.iter().enumerate() {
        let label = Chart::label(c);
        cv.text(
            ch.x(i) - 4.0 * label.len() as f64,
            H as f64 - BOTTOM + 10.0,
            &label,
            black,
        );
        cv.dot(
            ch.x(i),
            H as f64 - BOTTOM + 32.0,
            5,
            outcome_colour(c.outcome),
        );
    }
    for (k, (m, cand, col)) in SERIES.iter().enumerate() {
        let pts = ch.points(m, *cand);
        let dash = if *cand { 0 } else { 6 };
        for w in stroke(&pts).windows(2) {
            cv.line(w[0], w[1], *col, dash);
        }
        for &(x, y) in &pts {
            cv.dot(x, y, 3, *col);
        }
        let ly = TOP + 20.0 * k as f64;
        let lx = W as f64 - RIGHT + 15.0;
        cv.line((lx, ly), (lx + 20.0, ly), *col, dash);
        let who = if *cand { "cand" } else { "champ" };
        cv.text(lx + 26.0, ly - 5.0, &format!("{who} {m}"), black);
    }
    // No rotated text on this canvas: the y title sits above the axis, the x title below.
    cv.text(LEFT - 40.0, TOP - 16.0, Y_TITLE, black);
    cv.text(
        (LEFT + W as f64 - RIGHT) / 2.0 - 4.0 * X_TITLE.len() as f64,
        H as f64 - 14.0,
        X_TITLE,
        black,
    );
    let ly = TOP + 20.0 * SERIES.len() as f64 + 10.0;
    for (k, o) in [Outcome::Deployed, Outcome::Rejected, Outcome::RolledBack]
        .into_iter()
        .enumerate()
    {
        let y = ly + 18.0 * k as f64;
        cv.dot(W as f64 - RIGHT + 25.0, y, 5, outcome_colour(o));
        cv.text(W as f64 - RIGHT + 41.0, y - 5.0, o.as_str(), black);
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| anyhow!("png: {e}"))?;
        w.write_image_data(&cv.px)
            .map_err(|e| anyhow!("png: {e}"))?;
    }
    Ok(out)
}

/// Draws `cycles` to `path`; the format follows the extension (`.svg` or `.png`).
pub fn plot(cycles: &[CycleRecord], path: &Path) -> Result<()> {
    let ch = Chart::new(cycles)?;
    let bytes = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg(&ch).into_bytes(),
        Some("png") => png(&ch)?,
        _ => {
            bail!("{}: the plot file must end in .svg or .png", path.display())
        }
    };
    tandem_artifact::write_atomic(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycles() -> Vec<CycleRecord> {
        (1..=3)
            .map(|i| {
                let mut c = CycleRecord::new(i, 0);
                c.outcome = if i == 2 {
                    Outcome::Rejected
                } else {
                    Outcome::Deployed
                };
                c.version = (i != 2).then_some(tandem_types::ModelVersion(i));
                c.candidate_metrics
                    .insert("recall@50".into(), 0.2 + 0.05 * i as f64);
                c.champion_metrics.insert("recall@50".into(), 0.25);
                c
            })
            .collect()
    }

    #[test]
    fn svg_and_png_are_written_with_one_marker_per_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let svg_path = dir.path().join("h.svg");
        plot(&cycles(), &svg_path).unwrap();
        let text = std::fs::read_to_string(&svg_path).unwrap();
        assert_eq!(text.matches("<title>").count(), 3);
        assert!(text.contains("rejected"));
        let png_path = dir.path().join("h.png");
        plot(&cycles(), &png_path).unwrap();
        let bytes = std::fs::read(&png_path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!(reader.info().width, W as u32);
    }

    #[test]
    fn one_cycle_still_draws_each_series_as_a_line_and_both_axes_have_titles() {
        let dir = tempfile::tempdir().unwrap();
        let svg_path = dir.path().join("one.svg");
        plot(&cycles()[..1], &svg_path).unwrap();
        let text = std::fs::read_to_string(&svg_path).unwrap();
        let drawn: Vec<usize> = text
            .lines()
            .filter_map(|l| l.split("points=\"").nth(1))
            .map(|p| p.split('"').next().unwrap().split_whitespace().count())
            .filter(|&n| n > 0)
            .collect();
        assert_eq!(
            drawn,
            vec![2, 2],
            "candidate and champion recall@50: {text}"
        );
        assert!(text.contains(X_TITLE) && text.contains(Y_TITLE));
        for c in "recall@50".chars() {
            assert_ne!(glyph(c), [0; 5], "no glyph for {c:?}");
        }
    }

    #[test]
    fn an_unknown_extension_or_an_empty_history_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(plot(&cycles(), &dir.path().join("h.jpg")).is_err());
        assert!(plot(&[], &dir.path().join("h.svg")).is_err());
    }
}
