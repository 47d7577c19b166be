//! `muscle plot`: PNG charts of training curves (accuracy against steps, from runs'
//! metrics.jsonl) and of a sweep (accuracy against the number of labels, from results.csv),
//! drawn with plotters into an RGB buffer and encoded with the `image` crate. The text face is
//! embedded (assets/DejaVuSans-subset.ttf), so no system font is needed.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const WIDTH: u32 = 900;
const HEIGHT: u32 = 560;
const FONT: &str = "muscle-sans";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");

/// Line colours, in legend order (colour-blind-safe Okabe-Ito palette).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

/// One line of a chart: a name and (x, y, y error) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points in x order; the third value is a +- error bar (0 for none).
    pub points: Vec<(f64, f64, f64)>,
    /// Palette index, so that a method keeps its colour across charts.
    pub color: usize,
}

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    ok.then_some(()).ok_or_else(|| Error::format("the embedded plot font could not be parsed"))
}

fn draw_error(out: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(format!("{}: drawing failed: {e}", out.display()))
}

/// Draws `series` as lines with markers (and error bars where given) into a PNG at `out`.
pub fn render(series: &[Series], title: &str, x_label: &str, y_label: &str, log_x: bool, out: &Path) -> Result<()> {
    register_font()?;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y, e) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y - e), y1.max(y + e));
    }
    if x0 > x1 {
        return Err(Error::usage(format!("{}: nothing to plot (no points)", out.display())));
    }
    if log_x && x0 <= 0.0 {
        return Err(Error::usage(format!("{}: a log axis needs positive x values", out.display())));
    }
    let pad = ((y1 - y0) * 0.08).max(0.5);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(out, e))?;
        let mut b = ChartBuilder::on(&root);
        b.caption(title, (FONT, 22)).margin(16).x_label_area_size(48).y_label_area_size(64);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .label_style((FONT, 15))
                    .x_label_formatter(&|x| format!("{x:.0}"))
                    .y_label_formatter(&|y| format!("{y:.0}"))
                    .axis_desc_style((FONT, 17))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|e| draw_error(out, e))?;
                for s in series {
                    let c = PALETTE[s.color % PALETTE.len()];
                    chart
                        .draw_series(LineSeries::new(s.points.iter().map(|&(x, y, _)| (x, y)), c.stroke_width(2)))
                        .map_err(|e| draw_error(out, e))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3)));
                    if s.points.len() <= 40 {
                        chart
                            .draw_series(s.points.iter().map(|&(x, y, _)| Circle::new((x, y), 3, c.filled())))
                            .map_err(|e| draw_error(out, e))?;
                    }
                    chart
                        .draw_series(
                            s.points
                                .iter()
                                .filter(|p| p.2 > 0.0)
                                .map(|&(x, y, e)| ErrorBar::new_vertical(x, y - e, y, y + e, c.stroke_width(1), 8)),
                        )
                        .map_err(|e| draw_error(out, e))?;
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .label_font((FONT, 15))
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(200, 200, 200))
                    .draw()
                    .map_err(|e| draw_error(out, e))?;
            }};
        }
        if log_x {
            let c = b.build_cartesian_2d((x0 / 1.3..x1 * 1.3).log_scale(), y0..y1).map_err(|e| draw_error(out, e))?;
            draw!(c);
        } else {
            let span = (x1 - x0).max(1.0);
            let c = b.build_cartesian_2d(x0 - 0.02 * span..x1 + 0.02 * span, y0..y1).map_err(|e| draw_error(out, e))?;
            draw!(c);
        }
        root.present().map_err(|e| draw_error(out, e))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf).ok_or_else(|| draw_error(out, "buffer size"))?;
    write_png(&img, out)
}

/// Writes through a temporary file, so that a failed write leaves no half-written PNG.
pub(crate) fn write_png(img: &image::RgbImage, out: &Path) -> Result<()> {
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::new(crate::error::ErrorKind::Io, format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

/// The EMA test accuracy (%) against the step, from one run folder's metrics.jsonl.
pub fn run_curve(dir: &Path) -> Result<Series> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut points = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(format!("{}: line {}: {e}", path.display(), i + 1)))?;
        let step = v.get("step").and_then(|s| s.as_f64());
        let acc = v.get("test_accuracy_ema").and_then(|a| a.as_f64());
        match (step, acc) {
            (Some(s), Some(a)) => points.push((s, 100.0 * a, 0.0)),
            (Some(_), None) => {}
            _ => return Err(Error::format(format!("{}: line {}: no \"step\"", path.display(), i + 1))),
        }
    }
    if points.is_empty() {
        return Err(Error::format(format!("{}: no evaluation recorded", path.display())));
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    Ok(Series { name, points, color: 0 })
}

/// Mean and (population) standard deviation of the EMA test accuracy (%) per method against
/// the label count, from a sweep's results.csv, for the cells with this label imbalance.
pub fn sweep_series(csv: &Path, label_imbalance: f64) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(csv).map_err(|e| Error::io(csv, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| Error::format(format!("{}: no column \"{name}\" in the header", csv.display())))
    };
    let (cm, cl, ci, ca) = (col("method")?, col("labels")?, col("imbalance")?, col("test_accuracy_ema")?);
    let mut groups: BTreeMap<String, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || Error::format(format!("{}: line {}: malformed row", csv.display(), i + 2));
        let get = |c: usize| f.get(c).copied().ok_or_else(bad);
        let num = |c: usize| get(c)?.trim().parse::<f64>().map_err(|_| bad());
        if (num(ci)? - label_imbalance).abs() > 1e-9 {
            continue;
        }
        let labels = num(cl)?;
        groups.entry(get(cm)?.to_string()).or_default().entry(labels as u64).or_default().push(100.0 * num(ca)?);
    }
    if groups.is_empty() {
        return Err(Error::usage(format!("{}: no finished cell with imbalance {label_imbalance}", csv.display())));
    }
    let order = ["supervised", "muscle", "mixmatch", "mixmatch-muscle"];
    let rank = |m: &str| order.iter().position(|o| *o == m).unwrap_or(order.len());
    let mut out: Vec<Series> = groups
        .into_iter()
        .map(|(name, by_labels)| {
            let points = by_labels
                .into_iter()
                .map(|(l, accs)| {
                    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
                    let var = accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / accs.len() as f64;
                    (l as f64, mean, var.sqrt())
                })
                .collect();
            Series { color: rank(&name), name, points }
        })
        .collect();
    out.sort_by_key(|s| s.color);
    Ok(out)
}

/// `muscle plot` on run folders: one accuracy-against-steps curve per run.
pub fn plot_runs(runs: &[PathBuf], title: &str, out: &Path) -> Result<()> {
    let mut series = runs.iter().map(|d| run_curve(d)).collect::<Result<Vec<_>>>()?;
    series.iter_mut().enumerate().for_each(|(i, s)| s.color = i);
    render(&series, title, "step", "EMA test accuracy (%)", false, out)
}

/// `muscle plot --sweep`: accuracy against the label count, one line per method.
pub fn plot_sweep(dir: &Path, label_imbalance: f64, title: &str, out: &Path) -> Result<()> {
    let series = sweep_series(&dir.join("results.csv"), label_imbalance)?;
    render(&series, title, "labeled images", "EMA test accuracy (%), mean +- std over seeds", true, out)
}

/// The options of `muscle plot`.
#[derive(Clone, Debug, clap::Args)]
pub struct PlotArgs {
    /// Run folders written by `muscle train --out` (or a sweep's cells), one curve each.
    pub runs: Vec<PathBuf>,
    /// A sweep folder: plot its results.csv instead (mean +- std over seeds, log label axis).
    #[arg(long, conflicts_with = "runs")]
    pub sweep: Option<PathBuf>,
    /// With --sweep: the label imbalance whose cells are plotted.
    #[arg(long, alias = "imbalance", default_value_t = 1.0)]
    pub label_imbalance: f64,
    /// Chart title.
    #[arg(long, default_value = "")]
    pub title: String,
    /// The PNG file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `muscle plot`: the chart of a sweep folder (an empty title names the folder) or of run
/// folders, written to --out, which it then names on stdout.
pub fn command(a: &PlotArgs) -> Result<()> {
    match (&a.sweep, a.runs.is_empty()) {
        (Some(dir), _) => {
            let title = if a.title.is_empty() {
                format!("{} (imbalance {})", dir.display(), a.label_imbalance)
            } else {
                a.title.clone()
            };
            plot_sweep(dir, a.label_imbalance, &title, &a.out)?
        }
        (None, false) => plot_runs(&a.runs, &a.title, &a.out)?,
        (None, true) => return Err(Error::usage("plot: give run folders or --sweep DIR")),
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("muscle-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn sweep_series_groups_by_method_and_labels_with_mean_and_std() -> Result<()> {
        let d = tmpdir("sweep");
        let csv = d.join("results.csv");
        let rows = "method,dataset,model,labels,imbalance,seed,steps,test_accuracy,test_accuracy_ema,wall_seconds\n\
                    muscle,f,convnet,40,1,0,5,0.6,0.60,1\nmuscle,f,convnet,40,1,1,5,0.6,0.64,1\n\
                    supervised,f,convnet,250,1,0,5,0.7,0.70,1\nsupervised,f,convnet,40,1,0,5,0.5,0.50,1\n\
                    muscle,f,convnet,250,10,0,5,0.1,0.10,1\n";
        std::fs::write(&csv, rows).map_err(|e| Error::io(&csv, e))?;
        let s = sweep_series(&csv, 1.0)?;
        assert_eq!(s.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["supervised", "muscle"]);
        assert_eq!(s[0].points, vec![(40.0, 50.0, 0.0), (250.0, 70.0, 0.0)]);
        let (l, m, sd) = s[1].points[0];
        assert!(l == 40.0 && (m - 62.0).abs() < 1e-9 && (sd - 2.0).abs() < 1e-9);
        assert_eq!(sweep_series(&csv, 10.0)?[0].points, vec![(250.0, 10.0, 0.0)]);
        assert!(sweep_series(&csv, 3.0).is_err());
        std::fs::write(&csv, "method,labels\nmuscle,40\n").map_err(|e| Error::io(&csv, e))?;
        assert!(sweep_series(&csv, 1.0).is_err_and(|e| e.to_string().contains("imbalance")));
        Ok(())
    }

    #[test]
    fn plots_are_png_files_of_the_chart_size() -> Result<()> {
        let d = tmpdir("png");
        let run = d.join("muscle-n40");
        std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
        let m = "{\"step\":100,\"test_accuracy_ema\":0.5}\n{\"step\":200,\"test_accuracy_ema\":0.6}\n";
        std::fs::write(run.join("metrics.jsonl"), m).map_err(|e| Error::io(&run, e))?;
        let out = d.join("curves.png");
        plot_runs(std::slice::from_ref(&run), "test", &out)?;
        let img = image::open(&out).map_err(|e| Error::format(e.to_string()))?.to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // Something other than the white background was drawn (axes, text, the line).
        assert!(img.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 2000);
        assert!(!d.join("curves.png.tmp").exists());
        // A run folder without metrics is an error naming the file.
        let missing = d.join("nothing");
        assert!(plot_runs(&[missing], "t", &out).is_err_and(|e| e.to_string().contains("metrics.jsonl")));
        Ok(())
    }
}
