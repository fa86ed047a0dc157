//! BENCHMARKS.md is written by several benchmark commands, each owning one section between
//! its own markers; a run replaces its section and leaves the others alone.

use std::path::Path;

pub fn update_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let existing = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{section}{}", &existing[..b], &existing[e + end.len()..])
        }
        _ => format!("{}\n\n{section}\n", existing.trim_end()),
    };
    std::fs::write(path, updated)?;
    Ok(())
}

/// The value at quantile `q` (0..=1) of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place() {
        let dir =
            std::env::temp_dir().join(format!("report-{}", seckill_e2e::process::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("B.md");
        update_section(&path, "a", "one").unwrap();
        update_section(&path, "b", "two").unwrap();
        update_section(&path, "a", "three").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("three") && text.contains("two") && !text.contains("one"));
        assert!(
            text.find("three") < text.find("two"),
            "a stays before b: {text}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 51.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
