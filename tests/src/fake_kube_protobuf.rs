//! The protobuf bodies `kubectl create namespace|secret|configmap|job` send. kubectl's typed
//! clients write built-in kinds as `application/vnd.kubernetes.protobuf` and never fall back to
//! JSON (a 415 is an error to them), so the fake reads the few it meets:
//! the `k8s\0` magic, then a `runtime.Unknown` (`typeMeta` = 1, `raw` = 2) whose `raw` is the
//! object (apimachinery `pkg/runtime/serializer/protobuf/protobuf.go`; field numbers from the
//! `generated.proto` files of `k8s.io/api/core/v1` and `k8s.io/apimachinery/pkg/apis/meta/v1`):
//! - `ObjectMeta`: name 1, generateName 2, namespace 3, labels 11, annotations 12,
//!   ownerReferences 13 (`OwnerReference`: kind 1, name 3, uid 4, apiVersion 5, controller 6);
//! - `Namespace`: metadata 1; `ConfigMap`: metadata 1, data 2; `Secret`: metadata 1, data 2
//!   (bytes), type 3, stringData 4;
//! - `Job`: its metadata only. Only `kubectl create job --from=cronjob/NAME` sends one here, and
//!   its spec is the CronJob's `jobTemplate.spec` as it is (kubectl
//!   `pkg/cmd/create/create_job.go`, `createJobFromCronJob`), so the fake takes it from the
//!   CronJob its ownerReference names rather than decoding a whole PodSpec.

use serde_json::{json, Map, Value};

/// The magic that starts every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

/// The object in a protobuf body, as JSON (a Job without its spec), or why it cannot be read.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let unknown = body.strip_prefix(MAGIC).ok_or("no k8s protobuf magic")?;
    let unknown = parse(unknown)?;
    let type_meta = parse(message(&unknown, 1).ok_or("no typeMeta")?)?;
    let api_version = text(&type_meta, 1);
    let kind = text(&type_meta, 2);
    let object = parse(message(&unknown, 2).ok_or("no raw object")?)?;
    let mut json = json!({"apiVersion": api_version, "kind": kind});
    if let Some(meta) = message(&object, 1) {
        json["metadata"] = object_meta(&parse(meta)?)?;
    }
    match kind.as_str() {
        "Namespace" | "Job" => {}
        "ConfigMap" => json["data"] = string_map(&object, 2, false)?,
        "Secret" => {
            json["data"] = string_map(&object, 2, true)?;
            json["type"] = json!(text(&object, 3));
            json["stringData"] = string_map(&object, 4, false)?;
        }
        other => return Err(format!("the fake reads no protobuf {other}")),
    }
    Ok(json)
}

/// One field's value: a varint, or length-delimited bytes.
#[derive(Debug, Clone)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl<'a> Field<'a> {
    fn bytes(&self) -> &'a [u8] {
        match self {
            Field::Bytes(b) => b,
            Field::Varint(_) => &[],
        }
    }
}

/// A message's fields in order (wire types 0 and 2: all these messages use).
fn parse(mut bytes: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut bytes)?),
            2 => {
                let len = varint(&mut bytes)? as usize;
                let (value, rest) = bytes.split_at_checked(len).ok_or("truncated field")?;
                bytes = rest;
                Field::Bytes(value)
            }
            wire => return Err(format!("wire type {wire} is not read here")),
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("truncated varint")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

fn message<'a>(fields: &[(u64, Field<'a>)], number: u64) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(n, _)| *n == number)
        .map(|(_, f)| f.bytes())
}

fn text(fields: &[(u64, Field)], number: u64) -> String {
    let bytes = message(fields, number).unwrap_or_default();
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `map<string, string>` (or `bytes`, base64 as JSON has it) at `number`: repeated entries of
/// key 1, value 2.
fn string_map(fields: &[(u64, Field)], number: u64, binary: bool) -> Result<Value, String> {
    let mut map = Map::new();
    for (_, entry) in fields.iter().filter(|(n, _)| *n == number) {
        let entry = parse(entry.bytes())?;
        let value = message(&entry, 2).unwrap_or_default();
        let value = match binary {
            true => base64(value),
            false => String::from_utf8_lossy(value).into_owned(),
        };
        map.insert(text(&entry, 1), json!(value));
    }
    Ok(Value::Object(map))
}

fn object_meta(meta: &[(u64, Field)]) -> Result<Value, String> {
    let mut out = json!({"labels": string_map(meta, 11, false)?,
                         "annotations": string_map(meta, 12, false)?});
    for (number, key) in [(1, "name"), (2, "generateName"), (3, "namespace")] {
        let value = text(meta, number);
        if !value.is_empty() {
            out[key] = json!(value);
        }
    }
    let mut owners = Vec::new();
    for (_, owner) in meta.iter().filter(|(n, _)| *n == 13) {
        let owner = parse(owner.bytes())?;
        let controller = owner
            .iter()
            .any(|(n, f)| *n == 6 && matches!(f, Field::Varint(1)));
        owners.push(
            json!({"kind": text(&owner, 1), "name": text(&owner, 3), "uid": text(&owner, 4),
                           "apiVersion": text(&owner, 5), "controller": controller}),
        );
    }
    if !owners.is_empty() {
        out["ownerReferences"] = json!(owners);
    }
    Ok(out)
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubectl create namespace buildkite` sent (kubectl 1.32.4).
    #[test]
    fn a_namespace_from_kubectl() {
        let body = b"k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12!\n\x19\n\tbuildkite\x12\x00\x1a\x00\"\x00*\x002\x008\x00B\x00\x12\x00\x1a\x02\n\x00\x1a\x00\"\x00";
        let object = decode(body).unwrap();
        assert_eq!(object["kind"], "Namespace");
        assert_eq!(object["metadata"]["name"], "buildkite");
    }
}
