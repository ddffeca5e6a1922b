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

use crate::{
    ansible::attribution::Attribution,
    model::Model,
    trace::{AnsibleRecord, Footer, Header},
};

/// Output format of `report`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
    Markdown,
}

/// A saved trace with its process model and attribution, ready for any output.
pub struct Loaded {
    pub trace: crate::trace::Trace,
    pub model: Model,
    pub attribution: Attribution,
}

impl Loaded {
    /// Reads a trace straight into its model: the events are not kept, so memory is what the
    /// model needs, not the file's size. The file is opened as `owner` (under sudo, the user:
    /// see [`crate::output::open_read`]).
    pub fn read(
        path: &std::path::Path,
        owner: Option<&crate::record::launch::RunAs>,
    ) -> anyhow::Result<Self> {
        let file = crate::output::open_read(path, owner)?;
        let mut model = Model::default();
        let trace = crate::trace::Trace::read_file(file, path, |e| model.apply(&e))?;
        let attribution = Attribution::new(&model, &trace.ansible);
        Ok(Self { trace, model, attribution })
    }

    /// The attribution, when the plugins reported anything.
    pub fn ansible(&self) -> Option<&Attribution> {
        self.attribution.available.then_some(&self.attribution)
    }
}

/// Everything `report` shows: the run summary, the per-task tables for Ansible runs, and (with
/// details) latency histograms and the wall-time categories.
#[derive(Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub summary: summary::Summary,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub ansible: Option<tasks::TaskReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub histograms: Option<hist::Histograms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categories: Option<categories::Categories>,
}

impl Report {
    /// `ansible`: whether the run was an Ansible run (plugins injected); its tables are shown
    /// even when empty, so a broken channel is reported rather than hidden. `details` adds the
    /// histograms and categories.
    pub fn new(
        header: &Header,
        footer: Option<&Footer>,
        model: &Model,
        records: &[AnsibleRecord],
        ansible: bool,
        by: tasks::By,
        details: bool,
    ) -> Self {
        let attribution = Attribution::new(model, records);
        let available = attribution.available.then_some(&attribution);
        Self {
            summary: summary::Summary::new(header, footer, model),
            ansible: (ansible || available.is_some())
                .then(|| tasks::TaskReport::new(model, &attribution, by)),
            histograms: details.then(|| hist::Histograms::new(model, available)),
            categories: details.then(|| categories::Categories::new(header, footer, model, available)),
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
                if let Some(t) = &self.ansible {
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
                if let Some(t) = &self.ansible {
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
