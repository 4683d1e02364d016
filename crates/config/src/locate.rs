//! Finds the line and column of a field path such as `agents[2].site` in a
//! YAML document.
//!
//! serde_yaml keeps no spans, but it attaches the position of the current
//! event to any error raised while deserializing a value. So we walk the
//! document with a seed that follows the path and raises an error exactly
//! at the target value; that error's location is the answer.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            if open > 0 {
                segments.push(Segment::Key(rest[..open].to_string()));
            }
            rest = &rest[open..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(close) = stripped.find(']') else {
                    break;
                };
                if let Ok(i) = stripped[..close].parse() {
                    segments.push(Segment::Index(i));
                }
                rest = &stripped[close + 1..];
            }
        } else {
            segments.push(Segment::Key(rest.to_string()));
        }
    }
    segments
}

/// Line and column (1-based) of the value at `path`, if it exists.
pub(crate) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let segments = parse_path(path);
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match (Follow { path: &segments }).deserialize(deserializer) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

const FOUND: &str = "dicops-locate-found";
const MISSING: &str = "dicops-locate-missing";

struct Follow<'p> {
    path: &'p [Segment],
}

impl<'de> DeserializeSeed<'de> for Follow<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            deserializer.deserialize_any(Target)
        } else {
            deserializer.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Follow<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Segment::Key(wanted)) = self.path.first() else {
            return Err(de::Error::custom(MISSING));
        };
        while let Some(key) = map.next_key::<serde_yaml::Value>()? {
            if key.as_str() == Some(wanted.as_str()) {
                return map.next_value_seed(Follow { path: &self.path[1..] });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom(MISSING))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(Segment::Index(wanted)) = self.path.first() else {
            return Err(de::Error::custom(MISSING));
        };
        for _ in 0..*wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(MISSING));
            }
        }
        seq.next_element_seed(Follow { path: &self.path[1..] })?;
        Err(de::Error::custom(MISSING))
    }
}

/// Raises the marker error from inside the target value's own event, so
/// serde_yaml stamps it with that value's position.
struct Target;

impl<'de> Visitor<'de> for Target {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "listen: 0.0.0.0:9443\nsites:\n  - name: dc1\n  - name: dc2\nagents:\n  - id: db01\n    site: dc1\n  - {id: app01, site: dc9}\n";

    #[test]
    fn finds_nested_values() {
        assert_eq!(locate(DOC, "listen"), Some((1, 9)));
        assert_eq!(locate(DOC, "sites[1].name"), Some((4, 11)));
        assert_eq!(locate(DOC, "agents[0].site"), Some((7, 11)));
        assert_eq!(locate(DOC, "agents[1].site"), Some((8, 23)));
        assert_eq!(locate(DOC, "agents[1]"), Some((8, 5)));
    }

    #[test]
    fn missing_paths_have_no_location() {
        assert_eq!(locate(DOC, "agents[5].site"), None);
        assert_eq!(locate(DOC, "nothing"), None);
        assert_eq!(locate("not: [valid", "other"), None);
    }
}
