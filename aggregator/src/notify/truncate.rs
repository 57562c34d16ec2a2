//! Cutting text to a provider's limit on a character boundary, so emoji and CJK text stay
//! valid UTF-8 (a cut never splits a code point; it may split a grapheme cluster such as
//! a flag or a ZWJ emoji sequence, which stays valid text).

/// A length limit, in the unit the receiver counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this many Unicode scalar values (`char`s), as PagerDuty and Slack count.
    Chars(usize),
    /// At most this many bytes of UTF-8, as SMTP line limits and body sizes count.
    Bytes(usize),
}

/// The marker appended when text was cut.
pub const ELLIPSIS: char = '…';

/// `text` if it fits `limit`; otherwise its longest prefix that fits together with a
/// trailing [`ELLIPSIS`] (so the result, ellipsis included, is within `limit`). A limit
/// too small for the ellipsis itself gives a plain cut.
pub fn truncate(text: &str, limit: Limit) -> String {
    match limit {
        Limit::Chars(max) => {
            if text.chars().count() <= max {
                return text.to_owned();
            }
            if max == 0 {
                return String::new();
            }
            let mut out: String = text.chars().take(max - 1).collect();
            out.push(ELLIPSIS);
            out
        }
        Limit::Bytes(max) => {
            if text.len() <= max {
                return text.to_owned();
            }
            let mark = ELLIPSIS.len_utf8();
            let (keep, marked) = if max >= mark {
                (max - mark, true)
            } else {
                (max, false)
            };
            let cut = (0..=keep)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            let mut out = text[..cut].to_owned();
            if marked {
                out.push(ELLIPSIS);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_unchanged() {
        assert_eq!(truncate("abc", Limit::Chars(3)), "abc");
        assert_eq!(truncate("abc", Limit::Bytes(3)), "abc");
        assert_eq!(truncate("", Limit::Chars(0)), "");
        assert_eq!(truncate("服务", Limit::Bytes(6)), "服务");
    }

    #[test]
    fn cut_text_ends_with_the_ellipsis_within_the_limit() {
        assert_eq!(truncate("abcdef", Limit::Chars(4)), "abc…");
        assert_eq!(truncate("abcdef", Limit::Bytes(4)), "a…");
        assert_eq!(truncate("abcdef", Limit::Chars(1)), "…");
        assert_eq!(truncate("abcdef", Limit::Chars(0)), "");
        assert_eq!(
            truncate("abcdef", Limit::Bytes(2)),
            "ab",
            "no room for the mark"
        );
    }

    #[test]
    fn emoji_and_cjk_are_never_split() {
        let emoji = "🚨".repeat(4000);
        for max in [0, 1, 2, 3, 4, 5, 6, 7, 8, 1023, 1024, 1025, 998] {
            let b = truncate(&emoji, Limit::Bytes(max));
            assert!(b.len() <= max, "{max}: {} bytes", b.len());
            assert!(b.chars().all(|c| c == '🚨' || c == ELLIPSIS), "{max}");
            let c = truncate(&emoji, Limit::Chars(max));
            assert_eq!(c.chars().count(), max.min(4000));
        }
        let cjk = "服务不可用".repeat(300);
        let cut = truncate(&cjk, Limit::Bytes(1000));
        assert!(cut.len() <= 1000 && cut.ends_with(ELLIPSIS));
        assert!(cut.trim_end_matches(ELLIPSIS).len().is_multiple_of(3));
        let cut = truncate(&cjk, Limit::Chars(1024));
        assert_eq!(cut.chars().count(), 1024);
        assert!(cut.ends_with(ELLIPSIS));
    }
}
