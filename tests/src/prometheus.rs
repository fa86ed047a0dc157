//! Prometheus's own checker, promtool (Debian's `prometheus` package, installed by
//! `scripts/setup.sh`), and what the tests read from a text exposition and from the shipped
//! dashboard and alert rules.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

/// The shipped Grafana dashboard and alert rules, relative to the workspace root.
pub const DASHBOARD: &str = "deploy/grafana/seckill.json";
pub const ALERT_RULES: &str = "deploy/prometheus/seckill-alerts.yml";
pub const ALERT_RULE_TESTS: &str = "deploy/prometheus/seckill-alerts.test.yml";

/// promtool: `SECKILL_PROMTOOL`, or the first on `PATH`.
pub fn promtool() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("promtool"))
                .find(|candidate| candidate.exists())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/promtool"));
    crate::process::locate(
        "SECKILL_PROMTOOL",
        on_path,
        "run scripts/setup.sh (it installs Debian's prometheus package)",
    )
}

/// What promtool said: whether it exited 0, and everything it printed.
#[derive(Debug)]
pub struct Verdict {
    pub success: bool,
    pub output: String,
}

fn run(mut command: Command, stdin: Option<&str>) -> anyhow::Result<Verdict> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("cannot start promtool")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    Ok(Verdict {
        success: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// `promtool check metrics` on an exposition: lints names, types and help texts.
pub fn check_metrics(exposition: &str) -> anyhow::Result<Verdict> {
    let mut command = Command::new(promtool()?);
    command.args(["check", "metrics"]);
    run(command, Some(exposition))
}

/// `promtool check rules FILE`: parses every rule's PromQL.
pub fn check_rules(path: &Path) -> anyhow::Result<Verdict> {
    let mut command = Command::new(promtool()?);
    command.args(["check", "rules"]).arg(path);
    run(command, None)
}

/// `promtool test rules FILE`: runs the rules' unit tests.
pub fn test_rules(path: &Path) -> anyhow::Result<Verdict> {
    let mut command = Command::new(promtool()?);
    command.args(["test", "rules"]).arg(path);
    run(command, None)
}

/// One sample's value, named as the exposition writes it (say
/// `seckill_deduct_total{outcome="won"}`); None when the exposition has no such sample.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

/// Every metric name an exposition has: the families its `# TYPE` lines declare and the
/// names of its samples (a histogram's `_bucket`, `_sum` and `_count`).
pub fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_owned());
        }
    }
    names
}

/// The family each `# TYPE` line declares, with its type.
pub fn types(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// The gate's metric names (`seckill_*`, Envoy's `envoy_*`) a PromQL expression reads. Quoted
/// label values are left out (a cluster may be called `seckill_syncer`), and so are label names
/// (Envoy's start with `envoy_` too): the matchers in braces and the lists of `by`, `without`,
/// `on`, `ignoring`, `group_left` and `group_right`.
pub fn metric_names_in(expression: &str) -> BTreeSet<String> {
    without_label_lists(&without_braces(&without_quotes(expression)))
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("seckill_") || token.starts_with("envoy_"))
        .map(str::to_owned)
        .collect()
}

fn without_quotes(expression: &str) -> String {
    let mut unquoted = String::with_capacity(expression.len());
    let mut quote = None;
    let mut escaped = false;
    for c in expression.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                unquoted.push(' ');
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                unquoted.push(' ');
            }
            None => unquoted.push(c),
        }
    }
    unquoted
}

/// Blanks what is inside `{...}` (label matchers never nest).
fn without_braces(expression: &str) -> String {
    let mut depth = 0;
    expression
        .chars()
        .map(|c| match c {
            '{' => {
                depth += 1;
                ' '
            }
            '}' => {
                depth -= 1;
                ' '
            }
            _ if depth > 0 => ' ',
            _ => c,
        })
        .collect()
}

/// Blanks the label lists: `by (...)`, `on (...)`, ... (a list holds names only, no parens).
fn without_label_lists(expression: &str) -> String {
    const KEYWORDS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out: Vec<char> = expression.chars().collect();
    let mut at = 0;
    while at < out.len() {
        let starts_word = word(out[at]) && (at == 0 || !word(out[at - 1]));
        if !starts_word {
            at += 1;
            continue;
        }
        let end = (at..out.len())
            .find(|&i| !word(out[i]))
            .unwrap_or(out.len());
        let token: String = out[at..end].iter().collect();
        let open = (end..out.len()).find(|&i| !out[i].is_whitespace());
        if let (true, Some(open)) = (KEYWORDS.contains(&token.as_str()), open) {
            if out[open] == '(' {
                let close = (open..out.len())
                    .find(|&i| out[i] == ')')
                    .unwrap_or(out.len());
                for c in &mut out[open..close] {
                    *c = ' ';
                }
            }
        }
        at = end;
    }
    out.into_iter().collect()
}

/// The `expr` of every rule of a Prometheus rules file: a one-line `expr: ...` or an
/// `expr: |` block (the two forms the shipped file uses; anything else fails loudly).
pub fn rule_expressions(rules: &str) -> anyhow::Result<Vec<String>> {
    let mut expressions = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        anyhow::ensure!(
            indent.trim().is_empty() || indent.trim() == "-",
            "unexpected expr line: {line}"
        );
        let rest = rest.trim();
        if rest != "|" {
            anyhow::ensure!(
                !rest.is_empty() && !rest.starts_with('>'),
                "unexpected expr form: {line}"
            );
            expressions.push(rest.to_owned());
            continue;
        }
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            let deeper = next.len() - next.trim_start().len() > indent.len();
            if !deeper && !next.trim().is_empty() {
                break;
            }
            block.push(next.trim());
            lines.next();
        }
        expressions.push(block.join(" ").trim().to_owned());
    }
    Ok(expressions)
}

/// Grafana's variables in a query made concrete enough for PromQL's parser: interval variables
/// become a duration, any other variable (a label regex such as `$goods`) `.*`.
pub fn without_grafana_variables(query: &str) -> String {
    let mut text = query.to_owned();
    for interval in ["$__rate_interval", "$__interval", "$__range"] {
        text = text.replace(interval, "5m");
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            for inner in chars.by_ref() {
                if inner == '}' {
                    break;
                }
            }
        } else {
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
        }
        out.push_str(".*");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"v\"} 3\n\
                        # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";

    #[test]
    fn reads_names_types_and_samples() {
        let names = exposed_names(TEXT);
        for name in ["a_total", "h", "h_bucket", "h_sum", "h_count"] {
            assert!(names.contains(name), "{name} in {names:?}");
        }
        assert_eq!(names.len(), 5);
        assert_eq!(
            types(TEXT),
            vec![
                ("a_total".to_owned(), "counter".to_owned()),
                ("h".to_owned(), "histogram".to_owned())
            ]
        );
        assert_eq!(sample(TEXT, "a_total{k=\"v\"}"), Some(3.0));
        assert_eq!(sample(TEXT, "h_count"), Some(2.0));
        assert_eq!(sample(TEXT, "a_total"), None);
    }

    #[test]
    fn finds_metric_names_not_label_values() {
        let names = metric_names_in(
            "sum by (envoy_cluster_name, le) (rate(seckill_x_bucket{envoy_cluster_name=\"seckill_syncer\"}[5m])) \
             / on (envoy_response_code) group_left(envoy_zone) envoy_cluster_upstream_rq",
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["envoy_cluster_upstream_rq", "seckill_x_bucket"]
        );
    }

    #[test]
    fn reads_one_line_and_block_expressions() {
        let rules = "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n    \
                     for: 1m\n  - alert: B\n    expr: |\n      a > 0\n      and on () b\n    \
                     labels: {}\n";
        assert_eq!(
            rule_expressions(rules).unwrap(),
            vec!["up == 0".to_owned(), "a > 0 and on () b".to_owned()]
        );
    }

    #[test]
    fn grafana_variables_become_plain_promql() {
        assert_eq!(
            without_grafana_variables("rate(x{g=~\"$goods\", h=~\"${host}\"}[$__rate_interval])"),
            "rate(x{g=~\".*\", h=~\".*\"}[5m])"
        );
    }
}
