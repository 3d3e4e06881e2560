//! Label rules shared by every write path.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::snapshot::Labels;

/// containerd rejects a label whose key and value together exceed this.
pub const MAX_LABEL_SIZE: usize = 4096;

/// Checks sizes and drops empty values, which mean "unset" to containerd.
pub fn validate(labels: HashMap<String, String>) -> Result<Labels> {
    for (k, v) in &labels {
        check_size(k, v)?;
    }
    Ok(labels.into_iter().filter(|(_, v)| !v.is_empty()).collect())
}

pub fn check_size(key: &str, value: &str) -> Result<()> {
    let size = key.len() + value.len();
    if size > MAX_LABEL_SIZE {
        let shown: String = key.chars().take(64).collect();
        return Err(Error::invalid_argument(format!(
            "label {shown:?}{} is {size} bytes (key plus value); the limit is {MAX_LABEL_SIZE}",
            if shown.len() < key.len() { "..." } else { "" },
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_on_key_plus_value() {
        let key = "k".repeat(96);
        let ok = HashMap::from([(key.clone(), "v".repeat(MAX_LABEL_SIZE - 96))]);
        assert!(validate(ok).is_ok());
        let over = HashMap::from([(key, "v".repeat(MAX_LABEL_SIZE - 95))]);
        let err = validate(over).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("4097 bytes"), "{err}");
    }

    #[test]
    fn empty_values_are_dropped() {
        let l = validate(HashMap::from([
            ("a".into(), "".into()),
            ("b".into(), "1".into()),
        ]))
        .unwrap();
        assert_eq!(
            l.into_iter().collect::<Vec<_>>(),
            [("b".into(), "1".into())]
        );
    }
}
