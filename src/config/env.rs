//! `${NAME}` substitution from the environment, for secrets and addresses.

/// Why a value could not be expanded.
#[derive(Debug, PartialEq, Eq)]
pub enum EnvError {
    Missing(String),
    Unterminated,
    BadName(String),
}

impl std::fmt::Display for EnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(name) => write!(f, "environment variable `{name}` is not set"),
            Self::Unterminated => f.write_str("`${` without a closing `}`"),
            Self::BadName(name) => write!(f, "`{name}` is not a valid environment variable name"),
        }
    }
}

/// Replaces each `${NAME}` with the variable's value, looked up with `lookup`.
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(EnvError::Unterminated)?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(EnvError::BadName(name.to_owned()));
        }
        out.push_str(&lookup(name).ok_or_else(|| EnvError::Missing(name.to_owned()))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "sk-1".to_owned())
    }

    #[test]
    fn expands_and_reports() {
        assert_eq!(expand("${KEY}", &env), Ok("sk-1".into()));
        assert_eq!(expand("a-${KEY}-b", &env), Ok("a-sk-1-b".into()));
        assert_eq!(expand("plain", &env), Ok("plain".into()));
        assert_eq!(
            expand("${NOPE}", &env),
            Err(EnvError::Missing("NOPE".into()))
        );
        assert_eq!(expand("${KEY", &env), Err(EnvError::Unterminated));
        assert_eq!(expand("${1X}", &env), Err(EnvError::BadName("1X".into())));
    }
}
