//! The progress display of the commands that train: a one-line bar on a terminal, plain log lines
//! otherwise.

use crate::train::Progress;
use std::io::Write;

/// Shows `p`: on a terminal (`tty`) a bar redrawn every step, with a line per evaluation;
/// otherwise a log line every 50 steps and at every evaluation.
pub fn show(p: &Progress, tty: bool) {
    let eta = p.train_seconds / p.step as f64 * (p.steps - p.step) as f64;
    let text = format!(
        "step {}/{} loss {:.4} (sup {:.4}, mi {:.4}) {:.0} img/s eta {:.0}s",
        p.step, p.steps, p.loss, p.sup, p.mi, p.images_per_second, eta
    );
    if tty {
        let filled = (30 * p.step / p.steps.max(1)) as usize;
        print!("\r[{}{}] {text}   ", "#".repeat(filled), ".".repeat(30 - filled));
        if let Some((raw, ema)) = p.eval {
            println!("\n  eval at step {}: test accuracy {:.4}, EMA {:.4}", p.step, raw, ema);
        }
        let _ = std::io::stdout().flush();
    } else if let Some((raw, ema)) = p.eval {
        println!("{text} | test accuracy {raw:.4}, EMA {ema:.4}");
    } else if p.step.is_multiple_of(50) {
        println!("{text}");
    }
}
