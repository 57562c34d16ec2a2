//! Markdown to HTML for the public status page, safe for text that agents wrote:
//! raw HTML is shown as text, links and images keep only their text (no `javascript:`
//! or tracking URLs reach the page).

use pulldown_cmark::{Event, Parser, Tag, TagEnd, html};

/// Renders `md` (CommonMark) as an HTML fragment with no raw HTML, links or images.
pub fn to_html(md: &str) -> String {
    let events = Parser::new(md).filter_map(|e| match e {
        Event::Html(t) | Event::InlineHtml(t) => Some(Event::Text(t)),
        Event::Start(Tag::Link { .. } | Tag::Image { .. })
        | Event::End(TagEnd::Link | TagEnd::Image) => None,
        other => Some(other),
    });
    let mut out = String::new();
    html::push_html(&mut out, events);
    out
}

#[cfg(test)]
mod tests {
    use super::to_html;

    #[test]
    fn markdown_renders_and_html_does_not() {
        let h = to_html(
            "## Investigating\n\n**Status:** down <script>alert(1)</script> [x](javascript:alert(1)) ![i](http://t/i.png)",
        );
        assert!(h.contains("<h2>Investigating</h2>"), "{h}");
        assert!(h.contains("<strong>Status:</strong>"), "{h}");
        assert!(h.contains("&lt;script&gt;"), "{h}");
        assert!(!h.contains("<script"), "{h}");
        assert!(!h.contains("javascript:"), "{h}");
        assert!(!h.contains("<img"), "{h}");
    }
}
