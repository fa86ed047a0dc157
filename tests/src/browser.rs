//! Headless Chromium (Debian's `chromium`, installed by `scripts/setup.sh`), driven from its
//! command line: it loads a page, lets the page's scripts run for a bounded virtual time, then
//! prints the DOM they built or takes a screenshot. No DevTools client: the command line is
//! all a test of a page that draws itself needs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// A browser that has not finished by then is killed: the test fails instead of hanging.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Chromium {
    binary: PathBuf,
    /// Each run gets a profile directory of its own under here (Chromium locks its profile).
    profiles: PathBuf,
}

impl Chromium {
    /// `$SECKILL_CHROMIUM`, or `chromium` on the PATH; profiles go under `scratch`.
    pub fn locate(scratch: &Path) -> anyhow::Result<Chromium> {
        let binary = match std::env::var_os("SECKILL_CHROMIUM") {
            Some(path) => PathBuf::from(path),
            None => std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join("chromium"))
                .find(|path| path.is_file())
                .context("chromium not found on the PATH (set SECKILL_CHROMIUM to override); install it with scripts/setup.sh")?,
        };
        Ok(Chromium {
            binary,
            profiles: scratch.join("chromium"),
        })
    }

    /// The page's DOM after its scripts ran for `budget` of virtual time (Chromium's virtual
    /// clock waits for pending fetches, so polls that were sent are answered).
    pub async fn dump_dom(&self, url: &str, budget: Duration) -> anyhow::Result<String> {
        let budget = format!("--virtual-time-budget={}", budget.as_millis());
        let output = self.run(&[&budget, "--dump-dom", url]).await?;
        String::from_utf8(output).context("chromium printed a DOM that is not UTF-8")
    }

    /// A PNG of the page, `width` x `height`, after its scripts ran for `budget`.
    pub async fn screenshot(
        &self,
        url: &str,
        file: &Path,
        (width, height): (u32, u32),
        budget: Duration,
    ) -> anyhow::Result<()> {
        let budget = format!("--virtual-time-budget={}", budget.as_millis());
        let size = format!("--window-size={width},{height}");
        let target = format!("--screenshot={}", file.display());
        self.run(&[&budget, &size, "--hide-scrollbars", &target, url])
            .await?;
        Ok(())
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let profile = self.profiles.join(crate::process::unique_suffix());
        std::fs::create_dir_all(&profile)?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            // The tests run as root in a container: no sandbox, no GPU, no /dev/shm.
            .args(["--headless=new", "--no-sandbox", "--disable-gpu"])
            .args(["--disable-dev-shm-usage", "--no-first-run"])
            .args(["--no-default-browser-check", "--disable-extensions"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(RUN_TIMEOUT, command.output())
            .await
            .with_context(|| format!("chromium did not finish within {RUN_TIMEOUT:?}"))?
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "chromium failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output.stdout)
    }
}

/// The text of the element marked `data-field="{field}"` inside the element marked
/// `data-goods="{goods}"` (the whole document when `goods` is None), as a dumped DOM has it.
pub fn dom_field(dom: &str, goods: Option<&str>, field: &str) -> Option<String> {
    let scope = match goods {
        Some(goods) => {
            let start = dom.find(&format!("data-goods=\"{goods}\""))?;
            let rest = &dom[start..];
            &rest[..rest.find("</section>")?]
        }
        None => dom,
    };
    let at = scope.find(&format!("data-field=\"{field}\""))?;
    let rest = &scope[at..];
    let text = &rest[rest.find('>')? + 1..];
    Some(text[..text.find('<')?].trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::dom_field;

    #[test]
    fn fields_are_read_within_their_goods() {
        let dom = r#"<p data-field="status">live</p>
            <section class="sale" data-goods="a"><td data-field="sold">1</td></section>
            <section class="sale" data-goods="b"><td data-field="sold"> 2 </td></section>"#;
        assert_eq!(dom_field(dom, Some("b"), "sold").as_deref(), Some("2"));
        assert_eq!(dom_field(dom, Some("a"), "sold").as_deref(), Some("1"));
        assert_eq!(dom_field(dom, None, "status").as_deref(), Some("live"));
        assert_eq!(dom_field(dom, Some("c"), "sold"), None);
        assert_eq!(dom_field(dom, Some("a"), "status"), None);
    }
}
