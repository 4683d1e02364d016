//! Shell-style matching of one file name, as administrators write it in
//! config (`*.dump`, `db-????-??-??.tar.zst`, `[!.]*`).
//!
//! Syntax, as in the shell (POSIX `fnmatch` with `FNM_PATHNAME` and
//! `FNM_PERIOD`):
//! - `*` matches any run of characters, including none, but never `/`;
//! - `?` matches exactly one character, but not `/`;
//! - `[abc]`, `[a-z]` match one character from the set; `[!a-z]` or `[^a-z]`
//!   one character NOT in it. A `]` right after the opening `[` (or `[!`) is
//!   part of the set, as is a `-` first or last. Named classes such as
//!   `[:digit:]` are not supported (write `[0-9]`);
//! - `\` makes the next character literal (`\*` is a star, `\[` a bracket);
//! - any other character matches itself; matching is case-sensitive and
//!   works on characters, not bytes, so non-ASCII names are fine.
//!
//! Hidden files: a name starting with `.` is only matched by a pattern that
//! starts with a literal `.`. So `*.dump` does not match `.tmp.dump` (backup
//! tools often write in-progress files as hidden temporaries), and neither do
//! `?tmp.dump` or `[.]tmp.dump`; `.*.dump` does.
//!
//! Matching is iterative with a single backtracking point, so it takes at
//! most (pattern length × name length) steps whatever the pattern.
//!
//! [`glob_match`] never fails: a pattern that [`validate_glob`] rejects still
//! matches the way the shell would treat it (an unterminated `[` is a literal
//! `[`, a trailing `\` a literal backslash). Config validation calls
//! [`validate_glob`] so that such patterns never get that far.

/// One element of a parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A character that must appear as is.
    Char(char),
    /// `?`
    Any,
    /// `*`
    Star,
    /// `[...]`: inclusive ranges (a single character is a range of one).
    Class { negated: bool, ranges: Vec<(char, char)> },
}

impl Token {
    /// Whether this single-character token matches `c` (never true for `Star`).
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Char(expected) => *expected == c,
            Token::Any => c != '/',
            Token::Star => false,
            Token::Class { negated, ranges } => {
                c != '/' && ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// Reads one character inside a bracket class at `i`, honouring `\`.
/// Returns the character and the index after it, or `None` at the end.
fn class_char(p: &[char], i: usize) -> Option<(char, usize)> {
    match p.get(i)? {
        '\\' => p.get(i + 1).map(|&c| (c, i + 2)),
        &c => Some((c, i + 1)),
    }
}

/// Parses the bracket class whose `[` is at `start`. Returns the token and
/// the index after the closing `]`, or `None` if the class is unterminated.
fn parse_class(p: &[char], start: usize, problems: &mut Vec<String>) -> Option<(Token, usize)> {
    let mut i = start + 1;
    let negated = matches!(p.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *p.get(i)?;
        if c == ']' && !first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        if first && c == '[' && p.get(i + 1) == Some(&':') {
            problems.push(
                "named character classes such as [[:digit:]] are not supported; write a range such as [0-9]".into(),
            );
        }
        first = false;
        let (lo, next) = class_char(p, i)?;
        i = next;
        // `-` makes a range unless it is the last character before `]`.
        if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|&c| c != ']') {
            let (hi, next) = class_char(p, i + 1)?;
            i = next;
            if hi < lo {
                problems.push(format!("range {lo}-{hi} runs backwards and matches nothing"));
            }
            ranges.push((lo, hi));
        } else {
            ranges.push((lo, lo));
        }
    }
}

/// Parses a pattern leniently (as the shell does), recording in `problems`
/// what [`validate_glob`] should reject.
fn tokenize(pattern: &str, problems: &mut Vec<String>) -> Vec<Token> {
    let p: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '*' => {
                // Consecutive stars mean the same as one.
                if tokens.last() != Some(&Token::Star) {
                    tokens.push(Token::Star);
                }
                i += 1;
            }
            '?' => {
                tokens.push(Token::Any);
                i += 1;
            }
            '\\' => match p.get(i + 1) {
                Some(&c) => {
                    tokens.push(Token::Char(c));
                    i += 2;
                }
                None => {
                    problems.push("pattern ends with a lone \\ (write \\\\ for a backslash)".into());
                    tokens.push(Token::Char('\\'));
                    i += 1;
                }
            },
            '[' => match parse_class(&p, i, problems) {
                Some((token, next)) => {
                    tokens.push(token);
                    i = next;
                }
                None => {
                    problems.push(format!(
                        "[ at character {} is never closed by ] (write \\[ for a literal bracket)",
                        i + 1
                    ));
                    tokens.push(Token::Char('['));
                    i += 1;
                }
            },
            c => {
                tokens.push(Token::Char(c));
                i += 1;
            }
        }
    }
    tokens
}

/// Matches one `/`-free piece of the name against one `/`-free piece of the
/// pattern: the classic iterative algorithm that, on a mismatch, lets the
/// most recent `*` swallow one more character and retries from there.
fn match_segment(tokens: &[Token], name: &[char]) -> bool {
    // A leading dot must be matched by a literal dot.
    if name.first() == Some(&'.') && tokens.first() != Some(&Token::Char('.')) {
        return false;
    }
    let (mut t, mut n) = (0, 0);
    // (index of the token after the last `*`, name index that star ends at)
    let mut backtrack: Option<(usize, usize)> = None;
    while n < name.len() {
        match tokens.get(t) {
            Some(Token::Star) => {
                t += 1;
                backtrack = Some((t, n));
                continue;
            }
            Some(token) if token.matches(name[n]) => {
                t += 1;
                n += 1;
                continue;
            }
            _ => {}
        }
        match backtrack {
            Some((after_star, end)) => {
                // The star takes one more character; it never spans a `/`,
                // but segments contain none.
                t = after_star;
                n = end + 1;
                backtrack = Some((after_star, n));
            }
            None => return false,
        }
    }
    tokens[t..].iter().all(|token| *token == Token::Star)
}

/// Whether the file name `name` matches the shell pattern `pattern` (see the
/// module documentation for the syntax).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let tokens = tokenize(pattern, &mut Vec::new());
    let name: Vec<char> = name.chars().collect();
    // `*`, `?` and classes never match `/`, so a `/` in the name can only be
    // matched by a literal `/`: match piece by piece, like FNM_PATHNAME.
    let mut pattern_parts = tokens.split(|token| *token == Token::Char('/'));
    let mut name_parts = name.split(|&c| c == '/');
    loop {
        match (pattern_parts.next(), name_parts.next()) {
            (None, None) => return true,
            (Some(tokens), Some(name)) if match_segment(tokens, name) => {}
            _ => return false,
        }
    }
}

/// Checks a pattern from config: it must be non-empty, name a file (no `/`)
/// and be well-formed (closed `[` classes, no dangling `\`, no backwards
/// ranges, no unsupported `[:class:]`). The error says what is wrong.
pub fn validate_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("file name pattern is empty (use * to match every file)".into());
    }
    if pattern.contains('/') {
        return Err(format!(
            "file name pattern {pattern:?} contains /: it matches names within one directory, not paths"
        ));
    }
    let mut problems = Vec::new();
    tokenize(pattern, &mut problems);
    match problems.into_iter().next() {
        Some(problem) => Err(format!("file name pattern {pattern:?}: {problem}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_the_shell() {
        let cases: &[(&str, &str, bool)] = &[
            // literals
            ("backup.tar", "backup.tar", true),
            ("backup.tar", "backup.tarx", false),
            ("backup.tar", "Backup.tar", false),
            ("", "", true),
            ("", "a", false),
            // star
            ("*", "anything", true),
            ("*", "", true),
            ("*.dump", "db.dump", true),
            ("*.dump", ".dump", false),
            ("*.dump", "db.dump.tmp", false),
            ("db-*.dump", "db-2024-01-01.dump", true),
            ("db-*.dump", "db-.dump", true),
            ("*-*-*", "a-b-c", true),
            ("*-*-*", "a-b", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("***x", "abcx", true),
            ("*a", "aaaa", true),
            ("*ab", "aab", true),
            // question mark
            ("db-????.dump", "db-2024.dump", true),
            ("db-????.dump", "db-24.dump", false),
            ("?", "é", true),
            ("?", "", false),
            // classes
            ("[abc].log", "b.log", true),
            ("[abc].log", "d.log", false),
            ("[a-c].log", "c.log", true),
            ("[0-9][0-9]", "42", true),
            ("[0-9][0-9]", "4x", false),
            ("[!0-9]*", "x1", true),
            ("[!0-9]*", "1x", false),
            ("[^0-9]*", "1x", false),
            ("[^0-9]*", "x1", true),
            ("[]]", "]", true),
            ("[!]]", "]", false),
            ("[!]]", "a", true),
            ("[a-]", "-", true),
            ("[-a]", "-", true),
            ("[a-c-e]", "-", true),
            ("[a-c-e]", "d", false),
            ("[\\]x]", "]", true),
            ("[\\!]", "!", true),
            ("[é-ë]", "ê", true),
            ("[z-a]", "m", false),
            // escapes
            ("\\*", "*", true),
            ("\\*", "x", false),
            ("\\?", "?", true),
            ("\\[ab]", "[ab]", true),
            ("a\\\\b", "a\\b", true),
            ("trailing\\", "trailing\\", true),
            // unterminated class is a literal bracket, as in the shell
            ("[ab", "[ab", true),
            ("[ab", "a", false),
            // non-ASCII
            ("sauvegarde-*.tär", "sauvegarde-été.tär", true),
            ("日*", "日本", true),
        ];
        for &(pattern, name, expected) in cases {
            assert_eq!(glob_match(pattern, name), expected, "glob_match({pattern:?}, {name:?})");
        }
    }

    #[test]
    fn hidden_files_need_a_literal_dot() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.dump", ".tmp.dump", false),
            ("*", ".hidden", false),
            ("?tmp", ".tmp", false),
            ("[.]tmp", ".tmp", false),
            ("[!a]tmp", ".tmp", false),
            (".*", ".tmp", true),
            (".*.dump", ".tmp.dump", true),
            ("\\.tmp", ".tmp", true),
            (".tmp", ".tmp", true),
            // only a LEADING dot is special
            ("db*", "db.dump", true),
            ("db?dump", "db.dump", true),
            ("db[.]dump", "db.dump", true),
        ];
        for &(pattern, name, expected) in cases {
            assert_eq!(glob_match(pattern, name), expected, "glob_match({pattern:?}, {name:?})");
        }
    }

    #[test]
    fn wildcards_never_match_a_slash() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "a/b", false),
            ("a?b", "a/b", false),
            ("a[/]b", "a/b", false),
            ("a[!x]b", "a/b", false),
            ("*/*", "a/b", true),
            ("a/*", "a/.b", false),
        ];
        for &(pattern, name, expected) in cases {
            assert_eq!(glob_match(pattern, name), expected, "glob_match({pattern:?}, {name:?})");
        }
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let name = "a".repeat(10_000);
        let pattern = format!("{}b", "a*".repeat(100));
        assert!(!glob_match(&pattern, &name));
        let pattern = format!("{}a", "*a".repeat(100));
        assert!(glob_match(&pattern, &name));
    }

    #[test]
    fn validation() {
        let ok = [
            "*.dump",
            "db-????.tar.zst",
            "[!.]*",
            "[]]x",
            "\\[literal",
            "*.[ch]",
            ".*",
        ];
        for pattern in ok {
            assert_eq!(validate_glob(pattern), Ok(()), "{pattern:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("dumps/*.dump", "contains /"),
            ("/abs", "contains /"),
            ("[/]", "contains /"),
            ("db-[0-9.dump", "never closed"),
            ("[", "never closed"),
            ("[]", "never closed"),
            ("[!]", "never closed"),
            ("[a\\", "never closed"),
            ("dump\\", "lone \\"),
            ("[z-a]", "runs backwards"),
            ("[[:digit:]]", "named character classes"),
        ];
        for &(pattern, expected) in bad {
            let err = validate_glob(pattern).expect_err(pattern);
            assert!(err.contains(expected), "{pattern:?}: {err}");
        }
    }
}
