//! The ONNX protobuf messages kiln reads (a subset of `onnx.proto`, field numbers from it;
//! undeclared fields are skipped as unknown, still wire-checked), decoded with prost, and the
//! bytes of a tensor whatever its encoding (raw, typed fields, external data beside the model).
//!
//! Files are untrusted: prost refuses nesting deeper than 100 messages and truncated input;
//! every tensor's byte count is checked against its dims; an external location must be a plain
//! relative path inside the model's directory, and its range inside that file.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use bytes::Bytes;
use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(string, tag = "7")]
    pub domain: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Set inside FunctionProto bodies only (attribute reference); kiln can reject it.
    #[prost(string, tag = "21")]
    pub ref_attr_name: String,
    /// AttributeType discriminator (see `attr_type`). Kept as i32: unknown values must not fail.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(message, optional, boxed, tag = "6")]
    pub g: Option<Box<GraphProto>>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "10")]
    pub tensors: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub graphs: Vec<GraphProto>,
}

/// TensorProto.DataType values kiln cares about.
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const UINT16: i32 = 4;
    pub const INT16: i32 = 5;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const UINT32: i32 = 12;
    pub const UINT64: i32 = 13;
    pub const BFLOAT16: i32 = 16;
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    /// `Bytes`: zero-copy slice of the input when decoding from a `Bytes` (e.g. an mmap).
    #[prost(bytes = "bytes", tag = "9")]
    pub raw_data: Bytes,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(uint64, repeated, tag = "11")]
    pub uint64_data: Vec<u64>,
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    /// 0 = DEFAULT (inline), 1 = EXTERNAL
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    /// oneof value: only tensor_type (field 1) is modelled; sequence/map/optional types are skipped.
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProtoTensor {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Dimension {
    #[prost(oneof = "DimValue", tags = "1, 2")]
    pub value: Option<DimValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum DimValue {
    #[prost(int64, tag = "1")]
    DimValue(i64),
    #[prost(string, tag = "2")]
    DimParam(String),
}

/// Element size in bytes of the data types kiln reads.
fn element_size(data_type: i32) -> Option<usize> {
    Some(match data_type {
        dtype::FLOAT | dtype::INT32 | dtype::UINT32 => 4,
        dtype::FLOAT16 | dtype::BFLOAT16 | dtype::INT16 | dtype::UINT16 => 2,
        dtype::INT64 | dtype::DOUBLE | dtype::UINT64 => 8,
        dtype::UINT8 | dtype::INT8 | dtype::BOOL => 1,
        _ => return None,
    })
}

/// Most memory the messages of one ONNX file may decode to (each message counted at the size
/// of its struct, before decoding): about 3 million empty nodes, far more than any export.
const MAX_MESSAGE_BYTES: u64 = 512 << 20;

/// The messages kiln decodes, for [`message_bytes`]: which fields of each hold messages.
#[derive(Clone, Copy)]
enum Kind {
    Model,
    Graph,
    Node,
    Attribute,
    Tensor,
    ValueInfo,
    Type,
    TypeTensor,
    Shape,
    /// A message without message fields.
    Leaf(usize),
}

impl Kind {
    fn size(self) -> usize {
        use std::mem::size_of;
        match self {
            Kind::Model => size_of::<ModelProto>(),
            Kind::Graph => size_of::<GraphProto>(),
            Kind::Node => size_of::<NodeProto>(),
            Kind::Attribute => size_of::<AttributeProto>(),
            Kind::Tensor => size_of::<TensorProto>(),
            Kind::ValueInfo => size_of::<ValueInfoProto>(),
            Kind::Type => size_of::<TypeProto>(),
            Kind::TypeTensor => size_of::<TypeProtoTensor>(),
            Kind::Shape => size_of::<TensorShapeProto>(),
            Kind::Leaf(n) => n,
        }
    }

    /// The kind of the message in field `field`, if that field holds one.
    fn child(self, field: u64) -> Option<Kind> {
        use std::mem::size_of;
        let entry = Kind::Leaf(size_of::<StringStringEntryProto>());
        Some(match (self, field) {
            (Kind::Model, 7) | (Kind::Attribute, 6 | 11) => Kind::Graph,
            (Kind::Model, 8) => Kind::Leaf(size_of::<OperatorSetIdProto>()),
            (Kind::Model, 14) | (Kind::Tensor, 13) => entry,
            (Kind::Graph, 1) => Kind::Node,
            (Kind::Graph, 5) | (Kind::Attribute, 5 | 10) => Kind::Tensor,
            (Kind::Graph, 11..=13) => Kind::ValueInfo,
            (Kind::Node, 5) => Kind::Attribute,
            (Kind::ValueInfo, 2) => Kind::Type,
            (Kind::Type, 1) => Kind::TypeTensor,
            (Kind::TypeTensor, 2) => Kind::Shape,
            (Kind::Shape, 1) => Kind::Leaf(size_of::<Dimension>()),
            _ => return None,
        })
    }
}

/// Reads a varint at `*at`.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The bytes the messages in `b` (a message of `kind`) decode to, counted at their structs'
/// sizes; `None` once the total passes `budget` or when the wire format is malformed or nested
/// deeper than prost decodes (prost then refuses the file anyway).
fn message_bytes(b: &[u8], kind: Kind, depth: u32, budget: u64) -> Option<u64> {
    let mut total = kind.size() as u64;
    let mut at = 0;
    while at < b.len() && total <= budget {
        let key = varint(b, &mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => drop(varint(b, &mut at)?),
            1 => at = at.checked_add(8)?,
            5 => at = at.checked_add(4)?,
            2 => {
                let len = usize::try_from(varint(b, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|&e| e <= b.len())?;
                if let Some(child) = kind.child(field) {
                    if depth >= 100 {
                        return None;
                    }
                    total += message_bytes(&b[at..end], child, depth + 1, budget - total)?;
                }
                at = end;
            }
            // Groups (deprecated) are skipped by prost as unknown fields: nothing is kept.
            3 => {
                let mut open = 1u32;
                while open > 0 {
                    let key = varint(b, &mut at)?;
                    match key & 7 {
                        0 => drop(varint(b, &mut at)?),
                        1 => at = at.checked_add(8)?,
                        5 => at = at.checked_add(4)?,
                        2 => at = at.checked_add(usize::try_from(varint(b, &mut at)?).ok()?)?,
                        3 => open += 1,
                        4 => open -= 1,
                        _ => return None,
                    }
                }
            }
            _ => return None,
        }
    }
    (total <= budget && at <= b.len()).then_some(total)
}

/// Decodes a whole ONNX file; an empty or graph-less message is refused, and so is one whose
/// messages would take more than [`MAX_MESSAGE_BYTES`] decoded (a message with no fields
/// takes two bytes of the file and up to a few hundred of memory).
pub fn decode(bytes: Bytes) -> Result<ModelProto, String> {
    if message_bytes(&bytes, Kind::Model, 0, MAX_MESSAGE_BYTES).is_none()
        && message_bytes(&bytes, Kind::Model, 0, u64::MAX).is_some()
    {
        return Err(format!(
            "not an ONNX model kiln reads: its messages would take more than {} MiB decoded",
            MAX_MESSAGE_BYTES >> 20
        ));
    }
    let model = ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    if model.graph.is_none() {
        return Err("not an ONNX model: it has no graph".into());
    }
    Ok(model)
}

/// The external data file and byte range of `t`, if it is stored outside the model.
pub fn external_location(t: &TensorProto) -> Result<Option<(String, Option<usize>, Option<usize>)>, String> {
    if t.data_location != 1 {
        return Ok(None);
    }
    let kv = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
    let loc = kv("location").ok_or_else(|| format!("tensor {:?} is external but names no location", t.name))?;
    if loc.is_empty() || !Path::new(loc).components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("tensor {:?}: external data location {loc:?} is not a file beside the model", t.name));
    }
    let num = |k: &str| -> Result<Option<usize>, String> {
        kv(k)
            .map(|v| v.parse::<usize>().map_err(|_| format!("tensor {:?}: bad external {k} {v:?}", t.name)))
            .transpose()
    };
    Ok(Some((loc.to_string(), num("offset")?, num("length")?)))
}

/// The little-endian element bytes of `t`; `external` holds the external data files by location.
pub fn tensor_bytes(t: &TensorProto, external: &BTreeMap<String, Bytes>) -> Result<Bytes, String> {
    let size = element_size(t.data_type)
        .ok_or_else(|| format!("tensor {:?}: data type {} is not read", t.name, t.data_type))?;
    let numel = t.dims.iter().try_fold(1u64, |n, &d| u64::try_from(d).ok().and_then(|d| n.checked_mul(d)));
    let n_bytes = numel
        .and_then(|n| n.checked_mul(size as u64))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("tensor {:?}: bad dims {:?}", t.name, t.dims))?;
    let data = if let Some((loc, offset, length)) = external_location(t)? {
        let file =
            external.get(&loc).ok_or_else(|| format!("tensor {:?}: external data {loc:?} was not read", t.name))?;
        let (offset, length) = (offset.unwrap_or(0), length.unwrap_or(n_bytes));
        let end = offset.checked_add(length).filter(|&e| e <= file.len()).ok_or_else(|| {
            format!("tensor {:?}: bytes {offset}..+{length} run past the end of {loc} ({} bytes)", t.name, file.len())
        })?;
        file.slice(offset..end)
    } else if !t.raw_data.is_empty() {
        t.raw_data.clone()
    } else {
        let bytes: Vec<u8> = match t.data_type {
            dtype::FLOAT => t.float_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            dtype::DOUBLE => t.double_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            dtype::INT64 => t.int64_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            dtype::UINT32 | dtype::UINT64 => {
                t.uint64_data.iter().flat_map(|&x| x.to_le_bytes()[..size].to_vec()).collect()
            }
            // int32_data holds one element per int32 for every type of 32 bits or fewer.
            _ => t.int32_data.iter().flat_map(|&x| x.to_le_bytes()[..size].to_vec()).collect(),
        };
        Bytes::from(bytes)
    };
    if data.len() != n_bytes {
        return Err(format!("tensor {:?}: {} bytes of data, but dims {:?} need {n_bytes}", t.name, data.len(), t.dims));
    }
    Ok(data)
}

/// The values of a small numeric tensor as f64 (constants: epsilons, axes, shapes).
pub fn values(t: &TensorProto, external: &BTreeMap<String, Bytes>) -> Option<Vec<f64>> {
    let b = tensor_bytes(t, external).ok()?;
    let v = match t.data_type {
        dtype::FLOAT => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        dtype::DOUBLE => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        dtype::FLOAT16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        dtype::BFLOAT16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        dtype::INT64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        dtype::INT32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        _ => return None,
    };
    Some(v)
}

/// The tensor a `Constant` node produces (its `value`, `value_float(s)` or `value_int(s)`).
pub fn constant_value(n: &NodeProto) -> Option<TensorProto> {
    let a = n.attribute.first()?;
    let mut t = TensorProto::default();
    match a.name.as_str() {
        "value" => return a.t.clone(),
        "value_float" => (t.data_type, t.float_data) = (dtype::FLOAT, vec![a.f]),
        "value_floats" => {
            (t.data_type, t.dims, t.float_data) = (dtype::FLOAT, vec![a.floats.len() as i64], a.floats.clone())
        }
        "value_int" => (t.data_type, t.int64_data) = (dtype::INT64, vec![a.i]),
        "value_ints" => (t.data_type, t.dims, t.int64_data) = (dtype::INT64, vec![a.ints.len() as i64], a.ints.clone()),
        _ => return None,
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn external(location: &str) -> TensorProto {
        TensorProto {
            name: "w".into(),
            data_type: dtype::FLOAT,
            dims: vec![2, 2],
            data_location: 1,
            external_data: vec![StringStringEntryProto { key: "location".into(), value: location.into() }],
            ..Default::default()
        }
    }

    #[test]
    fn external_data_stays_beside_the_model() {
        for bad in ["../w.bin", "/etc/passwd", "", "a/../../b", "./../w"] {
            let e = external_location(&external(bad)).expect_err(bad);
            assert!(e.contains("not a file beside the model"), "{bad}: {e}");
        }
        assert_eq!(external_location(&external("w.bin")).unwrap().unwrap().0, "w.bin");
        assert_eq!(external_location(&external("data/w.bin")).unwrap().unwrap().0, "data/w.bin");
    }

    #[test]
    fn tensor_bytes_must_fit_the_dims() {
        let files = BTreeMap::from([("w.bin".to_string(), Bytes::from(vec![7u8; 20]))]);
        assert_eq!(tensor_bytes(&external("w.bin"), &files).unwrap().len(), 16);
        let mut t = external("w.bin");
        t.external_data.push(StringStringEntryProto { key: "offset".into(), value: "8".into() });
        let e = tensor_bytes(&t, &files).unwrap_err();
        assert!(e.contains("run past the end"), "{e}");
        let e = tensor_bytes(&external("other.bin"), &files).unwrap_err();
        assert!(e.contains("was not read"), "{e}");
        let inline = TensorProto {
            name: "c".into(),
            data_type: dtype::FLOAT,
            dims: vec![3],
            float_data: vec![1.0, 2.0],
            ..Default::default()
        };
        assert!(tensor_bytes(&inline, &files).unwrap_err().contains("need 12"));
        let huge = TensorProto { dims: vec![i64::MAX, 4], ..inline.clone() };
        assert!(tensor_bytes(&huge, &files).unwrap_err().contains("bad dims"));
        let ok = TensorProto { float_data: vec![1.0, 2.0, 0.5], ..inline };
        assert_eq!(values(&ok, &files), Some(vec![1.0, 2.0, 0.5]));
    }

    /// Millions of empty attributes (two bytes each in the file, hundreds of bytes decoded)
    /// are refused before decoding; the committed fuzz fixture decodes within the bound.
    #[test]
    fn decoded_size_is_bounded() {
        let n = (MAX_MESSAGE_BYTES as usize / std::mem::size_of::<AttributeProto>()) + 1;
        let node: Vec<u8> = [0x2a, 0].repeat(n); // field 5 (attribute), empty
        let mut graph = vec![0x0a]; // field 1 (node)
        prost::encoding::encode_varint(node.len() as u64, &mut graph);
        graph.extend(&node);
        let mut model = vec![0x3a]; // field 7 (graph)
        prost::encoding::encode_varint(graph.len() as u64, &mut model);
        model.extend(&graph);
        let e = decode(Bytes::from(model.clone())).unwrap_err();
        assert!(e.contains("MiB decoded"), "{e}");
        // A tenth of them decodes, and the count was a bound on what prost allocated.
        let small = [0x2a, 0].repeat(n / 10);
        let mut graph = vec![0x0a];
        prost::encoding::encode_varint(small.len() as u64, &mut graph);
        graph.extend(&small);
        let mut model = vec![0x3a];
        prost::encoding::encode_varint(graph.len() as u64, &mut model);
        model.extend(&graph);
        let counted = message_bytes(&model, Kind::Model, 0, u64::MAX).unwrap();
        let decoded = decode(Bytes::from(model)).unwrap();
        let attrs = decoded.graph.unwrap().node[0].attribute.len();
        assert_eq!(attrs, n / 10);
        assert!(counted >= (attrs * std::mem::size_of::<AttributeProto>()) as u64);
        // Truncated or malformed input is left to prost, which refuses it.
        assert!(decode(Bytes::from_static(&[0x3a, 5, 0x0a])).unwrap_err().contains("not an ONNX model"));
    }

    #[test]
    fn empty_and_garbage_input_is_not_a_model() {
        assert!(decode(Bytes::new()).unwrap_err().contains("no graph"));
        assert!(decode(Bytes::from_static(b"\xff\xff\xff\xff garbage")).unwrap_err().contains("not an ONNX model"));
    }
}
