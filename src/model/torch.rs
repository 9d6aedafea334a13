//! PyTorch checkpoints (`.pth`, `.pt`, `.ckpt`) read without PyTorch.
//!
//! Two container formats hold the same pickled object graph:
//! - the zip format (`torch.save` since 1.6): `<prefix>/data.pkl` plus one entry per storage,
//!   `<prefix>/data/<key>`, holding its raw little-endian elements;
//! - the legacy format (before 1.6, or `_use_new_zipfile_serialization=False`), in which
//!   many 2018-2020 ESRGAN models are saved: five pickles back to back (a magic number, the
//!   protocol version 1001, a `sys_info` dict, the object, the list of storage keys), then
//!   each storage in that list's order as an 8-byte little-endian element count followed
//!   by its raw elements.
//!
//! The pickles are read by a small unpickler of our own that executes nothing: it knows the
//! opcodes of protocols 0-5, rebuilds tensors from `torch._utils._rebuild_tensor_v2` (and
//! the older `_rebuild_tensor` and the `_rebuild_parameter` wrapper) on the storages named
//! by persistent ids, turns `collections.OrderedDict` into a dict (its `_metadata` state is
//! dropped), and keeps any other class as an opaque object. The state dict is then found
//! under the usual wrapper keys (`params_ema`, `params`, `state_dict`, ...), and a
//! `module.` or `netG.` prefix shared by every key is removed. TorchScript archives are
//! refused: they hold code, not a state dict.

use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use super::detect::Shapes;
use super::weights::StateDict;
use super::ModelError;

/// The wrapper keys a state dict is found under, in order of preference.
const WRAPPERS: [&str; 7] = [
    "params_ema",
    "params-ema",
    "params",
    "state_dict",
    "model_state_dict",
    "model",
    "net",
];
/// Key prefixes removed when every key has them (`nn.DataParallel`, GAN trainers).
const PREFIXES: [&str; 2] = ["module.", "netG."];
/// The first pickle of a legacy checkpoint holds this number.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i64 = 1001;

/// Reads the state dict of a PyTorch checkpoint file.
pub fn read(path: &std::path::Path) -> Result<StateDict, ModelError> {
    let bytes = read_file(path)?;
    read_bytes(&bytes).map_err(|why| ModelError::format(format!("{}: {why}", path.display())))
}

/// The names and shapes of a checkpoint file's tensors, without reading their data.
pub fn read_shapes(path: &std::path::Path) -> Result<Shapes, ModelError> {
    let bytes = read_file(path)?;
    shapes_bytes(&bytes).map_err(|why| ModelError::format(format!("{}: {why}", path.display())))
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|cause| ModelError::Io {
        path: path.display().to_string(),
        cause,
    })
}

/// Reads the state dict of a checkpoint held in memory; the error says what is wrong.
pub fn read_bytes(bytes: &[u8]) -> Result<StateDict, String> {
    match container(bytes)? {
        Container::Zip => {
            let (zip, prefix, state) = zip_records(bytes)?;
            let mut storages = HashMap::new();
            for (_, t) in &state {
                let key = &t.storage.key;
                if !storages.contains_key(key) {
                    let data = zip.entry(&format!("{prefix}data/{key}"))?;
                    storages.insert(key.clone(), data);
                }
            }
            materialize(state, &storages)
        }
        Container::Legacy => {
            let records = legacy_records(bytes)?;
            let storages = legacy_storages(bytes, &records)?;
            materialize(records.state, &storages)
        }
    }
}

/// The names and shapes of the state dict's tensors, from the pickle alone.
pub fn shapes_bytes(bytes: &[u8]) -> Result<Shapes, String> {
    let state = match container(bytes)? {
        Container::Zip => zip_records(bytes)?.2,
        Container::Legacy => {
            // The storages follow the pickles: check they are all there (a truncated file
            // is refused now, not when the model is first used).
            let records = legacy_records(bytes)?;
            legacy_storages(bytes, &records)?;
            records.state
        }
    };
    Ok(state.into_iter().map(|(k, t)| (k, t.shape)).collect())
}

enum Container {
    Zip,
    Legacy,
}

fn container(bytes: &[u8]) -> Result<Container, String> {
    if bytes.starts_with(b"PK\x03\x04") {
        Ok(Container::Zip)
    } else if bytes.first() == Some(&0x80) {
        Ok(Container::Legacy)
    } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        Err(
            "a tar checkpoint (PyTorch before 0.4), which is not supported: load it in \
             PyTorch and save it again"
                .into(),
        )
    } else {
        Err("not a PyTorch checkpoint (neither a zip archive nor a pickle)".into())
    }
}

/// The entries of a zip archive as PyTorch writes it: stored (uncompressed), in one folder,
/// with ZIP64 records when it is large. Names map to their data within the file.
struct Zip<'a> {
    bytes: &'a [u8],
    /// Name, data, and whether it is stored (compressed ones cannot be read).
    entries: Vec<(String, std::ops::Range<usize>, bool)>,
}

impl<'a> Zip<'a> {
    fn open(bytes: &'a [u8]) -> Result<Self, String> {
        let truncated = || "not a readable zip archive (truncated?)".to_string();
        let u16_at = |at: usize| -> Result<usize, String> {
            let b = bytes.get(at..at + 2).ok_or_else(truncated)?;
            Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
        };
        let u32_at = |at: usize| -> Result<u64, String> {
            let b = bytes.get(at..at + 4).ok_or_else(truncated)?;
            Ok(u32::from_le_bytes(b.try_into().expect("four bytes")).into())
        };
        let u64_at = |at: usize| -> Result<u64, String> {
            let b = bytes.get(at..at + 8).ok_or_else(truncated)?;
            Ok(u64::from_le_bytes(b.try_into().expect("eight bytes")))
        };
        let sig = |at: usize, magic: &[u8; 4]| bytes.get(at..at + 4) == Some(&magic[..]);
        // The end record: in the last 64 KiB (its comment is at most that long).
        let search_from = bytes.len().saturating_sub(22 + 65535);
        let eocd = (search_from..bytes.len().saturating_sub(21))
            .rev()
            .find(|&at| sig(at, b"PK\x05\x06"))
            .ok_or_else(truncated)?;
        let (mut count, mut cd_offset) = (u16_at(eocd + 10)? as u64, u32_at(eocd + 16)?);
        if eocd >= 20 && sig(eocd - 20, b"PK\x06\x07") {
            let z64 = usize::try_from(u64_at(eocd - 20 + 8)?).map_err(|_| truncated())?;
            if !sig(z64, b"PK\x06\x06") {
                return Err(truncated());
            }
            count = u64_at(z64 + 32)?;
            cd_offset = u64_at(z64 + 48)?;
        }
        let mut at = usize::try_from(cd_offset).map_err(|_| truncated())?;
        let mut entries = Vec::new();
        for _ in 0..count {
            if !sig(at, b"PK\x01\x02") {
                return Err("a zip archive with a damaged central directory".into());
            }
            let method = u16_at(at + 10)?;
            let (mut size, mut local) = (u32_at(at + 20)?, u32_at(at + 42)?);
            let uncompressed = u32_at(at + 24)?;
            let (name_len, extra_len, comment_len) =
                (u16_at(at + 28)?, u16_at(at + 30)?, u16_at(at + 32)?);
            let name = bytes
                .get(at + 46..at + 46 + name_len)
                .ok_or_else(truncated)?;
            let name = String::from_utf8_lossy(name).into_owned();
            // ZIP64 sizes and offsets, in this order, for the fields marked 0xFFFFFFFF.
            let mut extra = at + 46 + name_len;
            let extra_end = extra + extra_len;
            while extra + 4 <= extra_end {
                let (id, len) = (u16_at(extra)?, u16_at(extra + 2)?);
                if id == 1 {
                    let mut field = extra + 4;
                    if uncompressed == 0xFFFF_FFFF {
                        field += 8;
                    }
                    if size == 0xFFFF_FFFF {
                        size = u64_at(field)?;
                        field += 8;
                    }
                    if local == 0xFFFF_FFFF {
                        local = u64_at(field)?;
                    }
                }
                extra += 4 + len;
            }
            let local = usize::try_from(local).map_err(|_| truncated())?;
            if !sig(local, b"PK\x03\x04") {
                return Err(truncated());
            }
            let data = local + 30 + u16_at(local + 26)? + u16_at(local + 28)?;
            let end = usize::try_from(size)
                .ok()
                .and_then(|s| data.checked_add(s))
                .filter(|&e| e <= bytes.len())
                .ok_or_else(truncated)?;
            entries.push((name, data..end, method == 0));
            at = extra_end + comment_len;
        }
        Ok(Self { bytes, entries })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, ..)| n.as_str())
    }

    fn entry(&self, name: &str) -> Result<&'a [u8], String> {
        match self.entries.iter().find(|(n, ..)| n == name) {
            Some((_, r, true)) => Ok(&self.bytes[r.clone()]),
            Some(_) => Err(format!(
                "a zip archive with a compressed entry ({name}): PyTorch stores them \
                 uncompressed; save the checkpoint again with torch.save"
            )),
            None => Err(format!("the archive has no entry {name}")),
        }
    }
}

/// A state dict's tensor records, by key.
type Records = Vec<(String, TensorRef)>;

/// The zip archive, the folder its entries are in, and the state dict's tensor records.
fn zip_records(bytes: &[u8]) -> Result<(Zip<'_>, String, Records), String> {
    let zip = Zip::open(bytes)?;
    let names: Vec<String> = zip.names().map(str::to_string).collect();
    let in_top_folder = |suffix: &str| {
        names
            .iter()
            .find(|n| n.split_once('/').is_some_and(|(_, rest)| rest == suffix))
            .cloned()
    };
    if in_top_folder("constants.pkl").is_some()
        || names.iter().any(|n| {
            n.split_once('/')
                .is_some_and(|(_, r)| r.starts_with("code/"))
        })
    {
        return Err(
            "a TorchScript archive (torch.jit.save), not a state dict: load it in \
                    PyTorch and save `model.state_dict()` with torch.save"
                .into(),
        );
    }
    let pkl = in_top_folder("data.pkl")
        .ok_or("a zip archive without data.pkl: not a PyTorch checkpoint")?;
    let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();
    if let Some(order) = in_top_folder("byteorder") {
        let text = zip.entry(&order)?;
        if text.trim_ascii() != b"little" {
            return Err(format!(
                "a {} checkpoint: only little-endian is supported",
                String::from_utf8_lossy(text.trim_ascii())
            ));
        }
    }
    let mut vm = Unpickler::new(zip.entry(&pkl)?);
    let root = vm.load()?;
    let state = vm.state_dict(&root)?;
    Ok((zip, prefix, state))
}

/// The pickle at `*pos` of a legacy checkpoint, with the unpickler that holds its objects;
/// `*pos` moves past it.
fn next_pickle<'a>(
    bytes: &'a [u8],
    pos: &mut usize,
    what: &str,
) -> Result<(Value, Unpickler<'a>), String> {
    let mut vm = Unpickler::new(&bytes[*pos..]);
    let v = vm
        .load()
        .map_err(|e| format!("a legacy checkpoint whose {what} cannot be read: {e}"))?;
    *pos += vm.pos;
    Ok((v, vm))
}

/// What the pickles of a legacy checkpoint say.
struct LegacyRecords {
    state: Vec<(String, TensorRef)>,
    /// Every storage the object names, with its element type.
    dtypes: HashMap<String, DType>,
    /// Where the list of storage keys begins.
    keys_at: usize,
}

fn legacy_records(bytes: &[u8]) -> Result<LegacyRecords, String> {
    let mut pos = 0;
    let mut next = |what: &str| next_pickle(bytes, &mut pos, what);
    match next("header")?.0 {
        Value::BigInt(m) if m == LEGACY_MAGIC => {}
        _ => return Err("a pickle, but not a PyTorch checkpoint (no magic number)".into()),
    }
    match next("header")?.0 {
        Value::Int(LEGACY_PROTOCOL) => {}
        v => return Err(format!("unsupported legacy checkpoint version {v:?}")),
    }
    let (info, vm) = next("system info")?;
    if let Some(Value::Bool(false)) = vm.dict_get(&info, "little_endian") {
        return Err("a big-endian checkpoint: only little-endian is supported".into());
    }
    let (root, vm) = next("object")?;
    let state = vm.state_dict(&root)?;
    Ok(LegacyRecords {
        state,
        dtypes: vm.storages,
        keys_at: pos,
    })
}

/// The data of the storages the state dict uses: after the list of keys, each storage in
/// that list's order, as an 8-byte element count and its elements.
fn legacy_storages<'a>(
    bytes: &'a [u8],
    records: &LegacyRecords,
) -> Result<HashMap<String, &'a [u8]>, String> {
    let mut pos = records.keys_at;
    let (keys, vm) = next_pickle(bytes, &mut pos, "storage list")?;
    let malformed = || "a legacy checkpoint with a malformed storage list".to_string();
    let keys: Vec<String> = vm
        .items(&keys)
        .ok_or_else(malformed)?
        .iter()
        .map(|k| match k {
            Value::Str(s) => Ok(s.to_string()),
            _ => Err(malformed()),
        })
        .collect::<Result<_, _>>()?;
    let used: std::collections::HashSet<&str> = records
        .state
        .iter()
        .map(|(_, t)| t.storage.key.as_str())
        .collect();
    let truncated = |key: &str| format!("truncated: storage {key} ends past the end of the file");
    let mut storages = HashMap::new();
    for key in &keys {
        let count = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| truncated(key))?
            .try_into()
            .map(u64::from_le_bytes)
            .expect("eight bytes");
        pos += 8;
        // Every storage's size is needed to find the next, whether or not it is used.
        let elem = records
            .dtypes
            .get(key)
            .ok_or_else(|| format!("a legacy checkpoint whose storage {key} is never named"))?
            .size_in_bytes();
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(elem))
            .filter(|&len| len <= bytes.len() - pos)
            .ok_or_else(|| truncated(key))?;
        if used.contains(key.as_str()) {
            storages.insert(key.clone(), &bytes[pos..pos + len]);
        }
        pos += len;
    }
    Ok(storages)
}

/// Makes candle tensors from the state dict's tensor records and the storages' bytes.
fn materialize(
    state: Vec<(String, TensorRef)>,
    storages: &HashMap<String, &[u8]>,
) -> Result<StateDict, String> {
    let mut out = StateDict::new();
    for (name, t) in state {
        let data = storages
            .get(&t.storage.key)
            .ok_or_else(|| format!("tensor {name}: storage {} is missing", t.storage.key))?;
        let elem = t.storage.dtype.size_in_bytes();
        let stored = data.len() / elem;
        let numel: usize = t.shape.iter().product();
        if t.shape.len() != t.stride.len() {
            return Err(format!("tensor {name}: size and stride disagree"));
        }
        // The last element's index, which must lie inside the storage.
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&n, &s)| {
                acc.checked_add(n.saturating_sub(1).checked_mul(s)?)
            });
        if numel > 0 && last.is_none_or(|l| l >= stored) {
            return Err(format!(
                "tensor {name} reads past the end of its storage (truncated file?)"
            ));
        }
        let bytes = gather(data, elem, t.offset, &t.shape, &t.stride);
        let tensor = Tensor::from_raw_buffer(&bytes, t.storage.dtype, &t.shape, &Device::Cpu)
            .map_err(|e| format!("tensor {name}: {e}"))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// The elements of a strided view, in row-major order.
fn gather<'a>(
    data: &'a [u8],
    elem: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> std::borrow::Cow<'a, [u8]> {
    let numel: usize = shape.iter().product();
    let contiguous = shape
        .iter()
        .zip(stride)
        .rev()
        .try_fold(1usize, |expect, (&n, &s)| {
            (n <= 1 || s == expect).then_some(expect * n)
        })
        .is_some();
    if contiguous {
        return data[offset * elem..(offset + numel) * elem].into();
    }
    let mut out = Vec::with_capacity(numel * elem);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&data[at * elem..(at + 1) * elem]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out.into()
}

/// A storage named by a persistent id.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    key: String,
    dtype: DType,
}

/// A tensor as the pickle describes it: a view of a storage.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// A pickled value. Containers live on the unpickler's heap (`Ref`), so that the memo and
/// later mutations (APPEND, SETITEMS, BUILD) see one object, as in Python.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond i64 (only the legacy magic number, in practice).
    BigInt(u128),
    /// Floats and byte strings: their values are not needed.
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<[Value]>),
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Ref(usize),
}

#[derive(Debug)]
enum Obj {
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// An instance of a class we do not rebuild: kept only to say what it was.
    Object {
        class: Rc<(String, String)>,
    },
}

/// Bounds on what a pickle may make us allocate.
const MAX_ITEMS: usize = 1 << 24;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    heap: Vec<Obj>,
    /// Every storage named by a persistent id, with its element type.
    storages: HashMap<String, DType>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            heap: Vec::new(),
            storages: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("the pickle ends early (truncated file?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64, String> {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(self.take(n)?);
        Ok(u64::from_le_bytes(v))
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the pickle ends early (truncated file?)")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| "a pickle line that is not text".into())
    }

    fn sized(&mut self, len_bytes: usize) -> Result<&'a [u8], String> {
        let n = self.uint(len_bytes)?;
        let n = usize::try_from(n).map_err(|_| "an oversized pickle string")?;
        self.take(n)
    }

    fn text(bytes: &[u8]) -> Result<Value, String> {
        std::str::from_utf8(bytes)
            .map(|s| Value::Str(s.into()))
            .map_err(|_| "a pickle string that is not UTF-8".into())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "a malformed pickle (stack underflow)".into())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "a malformed pickle (empty stack)".into())
    }

    /// The values pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("a malformed pickle (no mark)")?;
        if mark > self.stack.len() {
            return Err("a malformed pickle (mark past the stack)".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn alloc(&mut self, obj: Obj) -> Value {
        self.heap.push(obj);
        Value::Ref(self.heap.len() - 1)
    }

    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or("a malformed pickle (unknown memo entry)")?;
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_ITEMS {
            return Err("a pickle with too many objects".into());
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn int(bytes: &[u8]) -> Value {
        // Little-endian two's complement, as LONG1 and LONG4 store it.
        if bytes.len() <= 8 {
            let neg = bytes.last().is_some_and(|&b| b & 0x80 != 0);
            let mut v = [if neg { 0xff } else { 0 }; 8];
            v[..bytes.len()].copy_from_slice(bytes);
            Value::Int(i64::from_le_bytes(v))
        } else if bytes.len() <= 16 && bytes.last().is_some_and(|&b| b & 0x80 == 0) {
            let mut v = [0u8; 16];
            v[..bytes.len()].copy_from_slice(bytes);
            Value::BigInt(u128::from_le_bytes(v))
        } else {
            Value::None
        }
    }

    fn append(&mut self, target: usize, items: Vec<Value>) -> Result<(), String> {
        match self.stack.get(target) {
            Some(Value::Ref(i)) => match &mut self.heap[*i] {
                Obj::List(l) => {
                    l.extend(items);
                    Ok(())
                }
                // Sets and other objects: contents are not needed.
                _ => Ok(()),
            },
            _ => Err("a malformed pickle (APPEND to a non-list)".into()),
        }
    }

    fn set_items(&mut self, target: usize, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("a malformed pickle (odd SETITEMS)".into());
        }
        match self.stack.get(target) {
            Some(Value::Ref(i)) => match &mut self.heap[*i] {
                Obj::Dict(d) => {
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                    Ok(())
                }
                _ => Ok(()),
            },
            _ => Err("a malformed pickle (SETITEM on a non-dict)".into()),
        }
    }

    /// Runs the pickle to its STOP and returns its value; `pos` is then just past STOP.
    fn load(&mut self) -> Result<Value, String> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    let proto = self.byte()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => {
                    let d = self.alloc(Obj::Dict(Vec::new()));
                    self.stack.push(d);
                }
                b']' => {
                    let l = self.alloc(Obj::List(Vec::new()));
                    self.stack.push(l);
                }
                b')' => self.stack.push(Value::Tuple(Rc::from([]))),
                0x8f => {
                    // EMPTY_SET: kept as a list (contents unused).
                    let l = self.alloc(Obj::List(Vec::new()));
                    self.stack.push(l);
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.stack.len().checked_sub(1).ok_or("empty stack")?;
                    self.append(target, items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let l = self.alloc(Obj::List(items));
                    self.stack.push(l);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items.into()));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("a malformed pickle (short tuple)".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items.into()));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let l = self.alloc(Obj::List(items));
                    self.stack.push(l);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.alloc(Obj::Dict(Vec::new()));
                    self.stack.push(d);
                    let target = self.stack.len() - 1;
                    self.set_items(target, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.stack.len().checked_sub(1).ok_or("empty stack")?;
                    self.append(target, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.stack.len().checked_sub(1).ok_or("empty stack")?;
                    self.append(target, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.stack.len().checked_sub(1).ok_or("empty stack")?;
                    self.set_items(target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.stack.len().checked_sub(1).ok_or("empty stack")?;
                    self.set_items(target, items)?;
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.take(4)?;
                    let v = i32::from_le_bytes(v.try_into().expect("four bytes"));
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.byte()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let b = self.sized(1)?;
                    self.stack.push(Self::int(b));
                }
                0x8b => {
                    let b = self.sized(4)?;
                    self.stack.push(Self::int(b));
                }
                b'I' | b'L' => {
                    let line = self.line()?.trim_end_matches('L');
                    let v = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(line.parse().map_err(|_| "a malformed pickle integer")?),
                    };
                    self.stack.push(v);
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'F' => {
                    self.line()?
                        .parse::<f64>()
                        .map_err(|_| "a malformed pickle float")?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let s = self.sized(4)?;
                    self.stack.push(Self::text(s)?);
                }
                0x8c => {
                    let s = self.sized(1)?;
                    self.stack.push(Self::text(s)?);
                }
                0x8d => {
                    let s = self.sized(8)?;
                    self.stack.push(Self::text(s)?);
                }
                // Python 2 byte strings: text for names and keys in practice.
                b'T' | b'U' => {
                    let s = self.sized(if op == b'T' { 4 } else { 1 })?;
                    let v = match std::str::from_utf8(s) {
                        Ok(t) => Value::Str(t.into()),
                        Err(_) => Value::Bytes,
                    };
                    self.stack.push(v);
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => 4,
                        b'C' => 1,
                        _ => 8,
                    };
                    self.sized(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'S' => {
                    let line = self.line()?;
                    let t = line.trim_matches(|c| c == '\'' || c == '"');
                    self.stack.push(Value::Str(t.into()));
                }
                b'V' => {
                    let line = self.line()?;
                    self.stack.push(Value::Str(line.into()));
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.stack.push(Value::Global(Rc::new((module, name))));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self
                            .stack
                            .push(Value::Global(Rc::new((m.to_string(), n.to_string())))),
                        _ => return Err("a malformed pickle (STACK_GLOBAL)".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: an object's state. An OrderedDict's `_metadata` and the state
                    // of objects we do not rebuild are not needed.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                b'P' => {
                    let line = self.line()?;
                    return Err(format!("an unsupported text persistent id `{line}`"));
                }
                b'h' => {
                    let k = self.byte()?.into();
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.uint(4)?;
                    self.memo_get(k)?;
                }
                b'g' => {
                    let k = self.line()?.parse().map_err(|_| "a malformed memo key")?;
                    self.memo_get(k)?;
                }
                b'q' => {
                    let k = self.byte()?.into();
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.uint(4)?;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let k = self.line()?.parse().map_err(|_| "a malformed memo key")?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                other => {
                    return Err(format!(
                        "an unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
            if self.stack.len() > MAX_ITEMS {
                return Err("a pickle with too many objects".into());
            }
        }
    }

    /// REDUCE and NEWOBJ: the few callables a state dict uses are rebuilt; any other class
    /// becomes an opaque object.
    fn call(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let Value::Global(class) = callable else {
            return Err("a malformed pickle (calling a non-class)".into());
        };
        let args: Vec<Value> = match args {
            Value::Tuple(t) => t.to_vec(),
            _ => Vec::new(),
        };
        let (module, name) = (class.0.as_str(), class.1.as_str());
        Ok(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                self.rebuild_tensor(&args)?
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                args.into_iter().next().unwrap_or(Value::None)
            }
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
                let d = self.alloc(Obj::Dict(Vec::new()));
                // OrderedDict([(k, v), ...]): the pairs come as a list of tuples.
                if let Some(items) = args.first().and_then(|a| self.items(a)) {
                    let mut flat = Vec::new();
                    for pair in items {
                        if let Value::Tuple(kv) = pair {
                            if kv.len() == 2 {
                                flat.extend(kv.iter().cloned());
                            }
                        }
                    }
                    self.stack.push(d.clone());
                    let target = self.stack.len() - 1;
                    self.set_items(target, flat)?;
                    self.stack.pop();
                }
                d
            }
            ("torch", "Size") | ("builtins" | "__builtin__", "tuple") => match args.first() {
                Some(Value::Tuple(t)) => Value::Tuple(t.clone()),
                Some(v @ Value::Ref(_)) => Value::Tuple(self.items(v).unwrap_or_default().into()),
                _ => Value::Tuple(Rc::from([])),
            },
            // Python 3 bytes pickled at protocol 2: encode(latin-1 text).
            ("_codecs", "encode") => Value::Bytes,
            _ => self.alloc(Obj::Object { class }),
        })
    }

    fn rebuild_tensor(&mut self, args: &[Value]) -> Result<Value, String> {
        let bad = || "a tensor with malformed arguments".to_string();
        let Some(Value::Storage(storage)) = args.first() else {
            return Err(bad());
        };
        let offset = match args.get(1) {
            Some(Value::Int(o)) if *o >= 0 => *o as usize,
            _ => return Err(bad()),
        };
        let dims = |v: Option<&Value>| -> Result<Vec<usize>, String> {
            match v {
                Some(Value::Tuple(t)) => t
                    .iter()
                    .map(|d| match d {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err(bad()),
                    })
                    .collect(),
                _ => Err(bad()),
            }
        };
        let shape = dims(args.get(2))?;
        let stride = dims(args.get(3))?;
        shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(bad)?;
        Ok(Value::Tensor(Rc::new(TensorRef {
            storage: storage.clone(),
            offset,
            shape,
            stride,
        })))
    }

    /// A persistent id: `('storage', <storage type>, key, location, numel[, view])`.
    fn persistent(&mut self, pid: Value) -> Result<Value, String> {
        let Value::Tuple(t) = pid else {
            return Err("an unsupported persistent id".into());
        };
        match (t.first(), t.get(1), t.get(2)) {
            (Some(Value::Str(kind)), Some(Value::Global(ty)), Some(Value::Str(key)))
                if &**kind == "storage" =>
            {
                if let Some(view) = t.get(5) {
                    if !matches!(view, Value::None) {
                        return Err("a legacy checkpoint with storage views, which is not \
                                    supported: load it in PyTorch and save it again"
                            .into());
                    }
                }
                let dtype = storage_dtype(&ty.1)
                    .ok_or_else(|| format!("tensors of an unsupported type ({})", ty.1))?;
                self.storages.insert(key.to_string(), dtype);
                Ok(Value::Storage(Rc::new(StorageRef {
                    key: key.to_string(),
                    dtype,
                })))
            }
            (Some(Value::Str(kind)), ..) if &**kind == "module" => Err(
                "a whole pickled model (torch.save(model)), not a state dict: save \
                 `model.state_dict()` instead"
                    .into(),
            ),
            _ => Err("an unsupported persistent id".into()),
        }
    }

    fn items(&self, v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Ref(i) => match &self.heap[*i] {
                Obj::List(l) => Some(l.clone()),
                _ => None,
            },
            Value::Tuple(t) => Some(t.to_vec()),
            _ => None,
        }
    }

    fn dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match v {
            Value::Ref(i) => match &self.heap[*i] {
                Obj::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }

    fn dict_get(&self, v: &Value, key: &str) -> Option<&Value> {
        self.dict(v)?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
            .map(|(_, v)| v)
    }

    fn describe(&self, v: &Value) -> String {
        match v {
            Value::Ref(i) => match &self.heap[*i] {
                Obj::List(_) => "a list".into(),
                Obj::Dict(_) => "a dict".into(),
                Obj::Object { class } => format!("a {}.{} object", class.0, class.1),
            },
            Value::Tensor(_) => "a single tensor".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::Str(_) | Value::Bytes => "a string".into(),
            Value::Int(_) | Value::BigInt(_) | Value::Float | Value::Bool(_) => "a number".into(),
            _ => "no object".into(),
        }
    }

    /// The state dict in `root`: under a wrapper key or a single nested dict, with a prefix
    /// every key shares removed.
    fn state_dict(&self, root: &Value) -> Result<Vec<(String, TensorRef)>, String> {
        let mut at = root;
        let mut path = String::new();
        loop {
            let Some(d) = self.dict(at) else {
                return Err(format!(
                    "the checkpoint holds {}{}, not a state dict",
                    self.describe(at),
                    if path.is_empty() {
                        String::new()
                    } else {
                        format!(" at `{path}`")
                    }
                ));
            };
            let wrapped = WRAPPERS.iter().find_map(|w| {
                self.dict_get(at, w)
                    .filter(|v| self.dict(v).is_some())
                    .map(|v| (*w, v))
            });
            let nested: Vec<&(Value, Value)> =
                d.iter().filter(|(_, v)| self.dict(v).is_some()).collect();
            let has_tensors = d.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
            let next = match (wrapped, nested.as_slice()) {
                (Some((w, v)), _) => Some((w.to_string(), v)),
                (None, [(Value::Str(k), v)]) if !has_tensors => Some((k.to_string(), v)),
                _ => None,
            };
            match next {
                Some((key, v)) => {
                    path = if path.is_empty() {
                        key
                    } else {
                        format!("{path}.{key}")
                    };
                    at = v;
                }
                None if has_tensors => break,
                None => {
                    let keys: Vec<String> = d
                        .iter()
                        .filter_map(|(k, _)| match k {
                            Value::Str(s) => Some(s.to_string()),
                            _ => None,
                        })
                        .take(8)
                        .collect();
                    return Err(format!(
                        "no state dict found in the checkpoint{}: its keys are {}",
                        if path.is_empty() {
                            String::new()
                        } else {
                            format!(" at `{path}`")
                        },
                        if keys.is_empty() {
                            "none".into()
                        } else {
                            keys.join(", ")
                        }
                    ));
                }
            }
        }
        let d = self.dict(at).expect("checked above");
        let mut tensors: Vec<(String, TensorRef)> = d
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.to_string(), (**t).clone())),
                _ => None,
            })
            .collect();
        for prefix in PREFIXES {
            if tensors.iter().all(|(k, _)| k.starts_with(prefix)) {
                for (k, _) in &mut tensors {
                    k.drain(..prefix.len());
                }
            }
        }
        Ok(tensors)
    }
}

/// The element type of a `torch.*Storage` class.
fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "ByteStorage" => DType::U8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_are_gathered_in_row_major_order() {
        let data: Vec<u8> = (0u8..12).collect();
        // A 2x3 view transposed from a 3x2 storage, one byte per element.
        assert_eq!(*gather(&data, 1, 0, &[2, 3], &[1, 2]), [0, 2, 4, 1, 3, 5]);
        assert_eq!(*gather(&data, 1, 6, &[2, 3], &[3, 1]), [6, 7, 8, 9, 10, 11]);
        assert_eq!(*gather(&data, 2, 1, &[2], &[1]), [2, 3, 4, 5]);
    }

    #[test]
    fn integers_of_any_width_decode() {
        assert!(matches!(Unpickler::int(&[0xff]), Value::Int(-1)));
        assert!(matches!(Unpickler::int(&[0x00, 0x01]), Value::Int(256)));
        let magic = LEGACY_MAGIC.to_le_bytes();
        assert!(matches!(Unpickler::int(&magic[..10]), Value::BigInt(m) if m == LEGACY_MAGIC));
    }

    #[test]
    fn non_checkpoints_are_refused_with_a_reason() {
        assert!(read_bytes(b"hello")
            .unwrap_err()
            .contains("not a PyTorch checkpoint"));
        // A pickle of the integer 7 (protocol 2): no magic number.
        let err = read_bytes(b"\x80\x02K\x07.").unwrap_err();
        assert!(err.contains("not a PyTorch checkpoint"), "{err}");
        let err = read_bytes(b"\x80\x02K").unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }
}
