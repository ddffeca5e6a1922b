//! Outputs built from a recording or a saved trace.
pub mod summary;

use clap::ValueEnum;

/// Output format of `report`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
    Markdown,
}

/// Renders a summary in the chosen format.
pub fn render(s: &summary::Summary, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Text => s.text(),
        Format::Markdown => s.markdown(),
        Format::Json => serde_json::to_string_pretty(s)? + "\n",
    })
}
