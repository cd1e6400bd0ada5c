//! `${name}` templates: text with variables filled per request from a context `C`, each
//! variable a name and a function that appends its value. `$${` is a literal `${`.
//!
//! The `transform` policy fills header values and JSON fields from the request context
//! (`${client_ip}`, `${request_id}`, ...); a `redirect` action fills its `Location` from the
//! request (`${host}`, `${request_uri}`, ...). One parser serves both, and the config check
//! reports an unknown variable with the list of known ones.

/// Appends a variable's value for one request.
pub type Fill<C> = fn(&C, &mut String);

/// A template split into text and variables, in one pass. Anything that is neither a known
/// `${name}` nor `$${` stays text, and the first such `${` is reported as the template's
/// problem (a config error where templates are checked).
pub struct Template<C: 'static> {
    pieces: Vec<Piece<C>>,
}

enum Piece<C: 'static> {
    Text(String),
    Variable(Fill<C>),
}

// By hand: derived impls would ask `C` itself to be `Clone` and `Debug`.
impl<C> Clone for Template<C> {
    fn clone(&self) -> Self {
        let pieces = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Text(text) => Piece::Text(text.clone()),
                Piece::Variable(fill) => Piece::Variable(*fill),
            })
            .collect();
        Self { pieces }
    }
}

impl<C> std::fmt::Debug for Template<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => list.entry(text),
                Piece::Variable(_) => list.entry(&format_args!("${{..}}")),
            };
        }
        list.finish()
    }
}

impl<C> Template<C> {
    /// Splits `template`, whose variables are among `variables`; the second value describes
    /// the first problem found, if any.
    pub fn parse(template: &str, variables: &[(&str, Fill<C>)]) -> (Self, Option<String>) {
        let mut pieces = Vec::new();
        let mut problem = None;
        let mut text = String::new();
        let mut rest = template;
        while let Some(at) = rest.find('$') {
            text.push_str(&rest[..at]);
            let from = &rest[at..];
            if let Some(tail) = from.strip_prefix("$${") {
                text.push_str("${");
                rest = tail;
                continue;
            }
            if let Some(tail) = from.strip_prefix("${") {
                match tail.split_once('}') {
                    Some((name, after)) => match variables.iter().find(|(n, _)| *n == name) {
                        Some((_, fill)) => {
                            if !text.is_empty() {
                                pieces.push(Piece::Text(std::mem::take(&mut text)));
                            }
                            pieces.push(Piece::Variable(*fill));
                            rest = after;
                            continue;
                        }
                        None => {
                            problem.get_or_insert_with(|| {
                                let known: Vec<String> =
                                    variables.iter().map(|(v, _)| format!("${{{v}}}")).collect();
                                format!(
                                    "unknown variable ${{{name}}} in {template:?} (known: {}; \
                                     write $${{ for a literal ${{)",
                                    known.join(", ")
                                )
                            });
                        }
                    },
                    None => {
                        problem.get_or_insert_with(|| {
                            format!(
                                "{template:?} opens a variable with \"${{\" that is never closed"
                            )
                        });
                    }
                }
            }
            text.push('$');
            rest = &from[1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        (Self { pieces }, problem)
    }

    /// The text of a template without variables.
    pub fn fixed(&self) -> Option<String> {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(text) => Some(text.as_str()),
                Piece::Variable(_) => None,
            })
            .collect()
    }

    /// The template with its variables filled from `ctx`.
    pub fn fill(&self, ctx: &C) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Variable(fill) => fill(ctx, &mut out),
            }
        }
        out
    }
}

/// A header value from config: fixed when its template has no variable (built once), else
/// filled per request.
pub enum HeaderTemplate<C: 'static> {
    Fixed(http::HeaderValue),
    Variables(Template<C>),
}

impl<C> HeaderTemplate<C> {
    /// The header template of `template`, already parsed from `raw`; `None` when `raw` is not
    /// a valid header value. Variables fill in parts of a request or names from the config,
    /// none of which can make a valid value invalid; so the template itself must be one.
    pub fn new(raw: &str, template: Template<C>) -> Option<Self> {
        http::HeaderValue::try_from(raw).ok()?;
        Some(match template.fixed() {
            Some(text) => Self::Fixed(http::HeaderValue::try_from(text).ok()?),
            None => Self::Variables(template),
        })
    }

    /// The value for one request; `None` if the filled text is no valid header value.
    pub fn value(&self, ctx: &C) -> Option<http::HeaderValue> {
        self.value_with(|| ctx)
    }

    /// [`Self::value`], with the context made only when there are variables to fill.
    pub fn value_with<R: std::borrow::Borrow<C>>(
        &self,
        ctx: impl FnOnce() -> R,
    ) -> Option<http::HeaderValue> {
        match self {
            Self::Fixed(v) => Some(v.clone()),
            Self::Variables(t) => http::HeaderValue::try_from(t.fill(ctx().borrow())).ok(),
        }
    }
}

// By hand, as for `Template`.
impl<C> Clone for HeaderTemplate<C> {
    fn clone(&self) -> Self {
        match self {
            Self::Fixed(v) => Self::Fixed(v.clone()),
            Self::Variables(t) => Self::Variables(t.clone()),
        }
    }
}

impl<C> std::fmt::Debug for HeaderTemplate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(v) => f.debug_tuple("Fixed").field(v).finish(),
            Self::Variables(t) => f.debug_tuple("Variables").field(t).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VARS: [(&str, Fill<u32>); 2] = [
        ("n", |n, out| out.push_str(&n.to_string())),
        ("twice", |n, out| out.push_str(&(n * 2).to_string())),
    ];

    #[test]
    fn variables_escapes_and_problems() {
        let (t, problem) = Template::parse("a${n}b${twice}$${n}$", &VARS);
        assert_eq!(problem, None);
        assert_eq!(t.fill(&21), "a21b42${n}$");
        assert_eq!(t.fixed(), None);
        let (t, _) = Template::parse("plain $${x}", &VARS);
        assert_eq!(t.fixed().as_deref(), Some("plain ${x}"));
        let (_, problem) = Template::parse("${nope}", &VARS);
        assert!(problem.unwrap().contains("known: ${n}, ${twice}"));
        let (_, problem) = Template::parse("x${n", &VARS);
        assert!(problem.unwrap().contains("never closed"));
    }
}
