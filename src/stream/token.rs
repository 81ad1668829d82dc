//! Stream tokens: 32 random bytes in padded base64url (44 characters), the format the original cc-proxy used,
//! so one token format serves the JSON-RPC API and the legacy protocol alike.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use rand::RngCore;

/// Length of a token's text form.
pub const TOKEN_LEN: usize = 44;

/// An unguessable handle on one process's stdio stream (256 bits from the OS-seeded CSPRNG).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Arc<str>);

impl Token {
    pub fn generate() -> Token {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Token(
            base64::engine::general_purpose::URL_SAFE
                .encode(bytes)
                .into(),
        )
    }

    /// Accept a client-supplied token only if it has the shape of one (cheap to reject garbage early).
    pub fn parse(s: &str) -> Option<Token> {
        let ok = s.len() == TOKEN_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=');
        ok.then(|| Token(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short prefix for log lines, so logs never carry a usable token.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}…)", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_44_chars_and_distinct() {
        let a = Token::generate();
        let b = Token::generate();
        assert_eq!(a.as_str().len(), TOKEN_LEN);
        assert!(a.as_str().ends_with('='));
        assert_ne!(a, b);
        assert_eq!(Token::parse(a.as_str()), Some(a));
        assert_eq!(Token::parse("short"), None);
        assert_eq!(Token::parse(&"!".repeat(44)), None);
    }
}
