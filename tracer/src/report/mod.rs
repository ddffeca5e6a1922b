//! Outputs built from a recording or a saved trace.
pub mod categories;
pub mod flamegraph;
pub mod hist;
pub mod labels;
pub mod summary;
pub mod tasks;
pub mod timeline;

use clap::ValueEnum;
use serde::Serialize;

use crate::analysis::Analysis;

/// Output format of `report`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
    Markdown,
}

/// How much a [`Report`] shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// The summary and the task table (what `record` prints at exit).
    Summary,
    /// Also the latency histograms and the wall-time categories (`report`).
    Full,
}

/// Everything `report` shows: the run summary, the per-task tables for Ansible runs, and (in
/// full) latency histograms and the wall-time categories.
#[derive(Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub summary: summary::Summary,
    /// Shown for every Ansible run, even when no plugin message arrived: a broken channel is
    /// reported rather than hidden.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<tasks::TaskReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub histograms: Option<hist::Histograms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categories: Option<categories::Categories>,
}

impl Report {
    /// `by`: the rows of the task table.
    pub fn new(analysis: &Analysis, by: tasks::By, detail: Detail) -> Self {
        let full = detail == Detail::Full;
        Self {
            summary: summary::Summary::new(analysis),
            tasks: analysis.ansible_run().then(|| tasks::TaskReport::new(analysis, by)),
            histograms: full.then(|| hist::Histograms::new(analysis)),
            categories: full.then(|| categories::Categories::new(analysis)),
        }
    }

    /// The report as text, Markdown or JSON. Text and Markdown are for terminals: names from the
    /// trace (exe names, argv, task names) are printed with control characters escaped.
    pub fn render(&self, format: Format, top_n: usize) -> anyhow::Result<String> {
        let text = self.render_raw(format, top_n)?;
        Ok(match format {
            Format::Json => text,
            Format::Text | Format::Markdown => labels::printable_text(&text).into_owned(),
        })
    }

    fn render_raw(&self, format: Format, top_n: usize) -> anyhow::Result<String> {
        Ok(match format {
            Format::Text => {
                let mut s = self.summary.text();
                if let Some(t) = &self.tasks {
                    s.push('\n');
                    s.push_str(&t.text(top_n));
                }
                for extra in
                    [self.histograms.as_ref().map(|h| h.text()), self.categories.as_ref().map(|c| c.text())]
                        .into_iter()
                        .flatten()
                {
                    s.push('\n');
                    s.push_str(&extra);
                }
                s
            }
            Format::Markdown => {
                let mut s = self.summary.markdown();
                if let Some(t) = &self.tasks {
                    s.push_str("\n### Tasks\n\n");
                    s.push_str(&t.markdown());
                }
                if let Some(h) = &self.histograms {
                    s.push_str("\n### Latencies\n\n");
                    s.push_str(&h.markdown());
                }
                if let Some(c) = &self.categories {
                    s.push_str("\n### Where the wall time went\n\n");
                    s.push_str(&c.markdown());
                }
                s
            }
            Format::Json => serde_json::to_string_pretty(self)? + "\n",
        })
    }
}
