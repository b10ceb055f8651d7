//! Erlang terms -> core values, without copying where the term allows it.

use std::cell::{Cell, OnceCell, RefCell};
use std::fmt;

use erlmcp_rollout::flags::{Context, FlagId, ForeignTerm, PinnableClock, Snapshot, Value};
use rustc_hash::FxHashMap;
use rustler::sys::{
    c_char, c_uint, enif_get_atom, enif_get_map_size, enif_get_map_value, enif_inspect_binary, ErlNifBinary,
    ErlNifCharEncoding, ErlNifTerm,
};
use rustler::types::map::MapIterator;
use rustler::{Atom, Binary, Term, TermType};

/// The bytes of a binary term, borrowed for the term's lifetime; `None` for
/// other terms. (rustler's `Binary` decode does the same plus bookkeeping.)
#[inline]
pub fn binary_bytes<'t>(term: Term<'t>) -> Option<&'t [u8]> {
    let mut bin = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
    // SAFETY: valid env and term; on success enif_inspect_binary fills `bin`
    // with a pointer to `size` bytes that stay valid while the term's env
    // lives, which `'t` bounds.
    unsafe {
        if enif_inspect_binary(term.get_env().as_c_arg(), term.as_c_arg(), bin.as_mut_ptr()) == 0 {
            return None;
        }
        let bin = bin.assume_init();
        if bin.size == 0 {
            return Some(&[]);
        }
        Some(std::slice::from_raw_parts(bin.data, bin.size))
    }
}

/// A new binary term holding a copy of `bytes`.
pub fn bytes_term<'a>(env: rustler::Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut bin = rustler::NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    Binary::from(bin).to_term(env)
}

/// Longest atom text in UTF-8: 255 characters of up to 4 bytes.
pub const ATOM_BUF: usize = 1024;

/// The UTF-8 text of an atom, written into `buf`.
///
/// OTP 25's NIF API reads atoms only as latin-1; atoms with characters above
/// 255 are read from their external term format (`ATOM_UTF8_EXT`).
pub fn atom_text<'b>(term: Term<'_>, buf: &'b mut [u8; ATOM_BUF]) -> Option<&'b str> {
    let mut latin1 = [0u8; 256];
    // SAFETY: enif_get_atom writes at most `len` bytes (including the NUL)
    // into the buffer we own, and returns 0 when the term is not an atom or
    // does not fit latin-1.
    let n = unsafe {
        enif_get_atom(
            term.get_env().as_c_arg(),
            term.as_c_arg(),
            latin1.as_mut_ptr() as *mut c_char,
            latin1.len() as c_uint,
            ErlNifCharEncoding::ERL_NIF_LATIN1,
        )
    };
    if n > 0 {
        let len = (n as usize).saturating_sub(1);
        let mut at = 0;
        for &b in latin1.get(..len)? {
            let mut tmp = [0u8; 4];
            let s = char::from(b).encode_utf8(&mut tmp);
            buf.get_mut(at..at + s.len())?.copy_from_slice(s.as_bytes());
            at += s.len();
        }
        return std::str::from_utf8(buf.get(..at)?).ok();
    }
    if term.get_type() != TermType::Atom {
        return None;
    }
    // Characters above latin-1: <<131, 118, Len:16, Text>> or <<131, 119, Len:8, Text>>.
    let ext = term.to_binary();
    let (len, text) = match ext.as_slice() {
        [131, 118, hi, lo, rest @ ..] => (usize::from(*hi) << 8 | usize::from(*lo), rest),
        [131, 119, len, rest @ ..] => (usize::from(*len), rest),
        _ => return None,
    };
    let text = text.get(..len)?;
    buf.get_mut(..len)?.copy_from_slice(text);
    std::str::from_utf8(buf.get(..len)?).ok()
}

/// A context key of the published snapshot and its atom. `addr` is the
/// address of the snapshot's own copy of the key, which evaluation passes
/// back to [`Context::get`]: matching it is one integer compare.
pub struct KeyAtom {
    pub addr: usize,
    pub text: Box<str>,
    pub atom: Atom,
}

/// Atoms made once per loaded config: the context keys it reads (looked up
/// by name, few enough for a linear scan) and its flag names (looked up by
/// the atom's term word, so an atom name costs no text decoding).
#[derive(Default)]
pub struct Tables {
    /// (address of the snapshot's key string, its text, its atom).
    pub key_atoms: Vec<KeyAtom>,
    /// Flag name atom -> the flag's id in the published snapshot.
    pub flag_atoms: FxHashMap<ErlNifTerm, FlagId>,
}

impl Tables {
    /// The flag named by a binary or an atom in `snapshot` (the snapshot
    /// these tables were made for), without copying. `Ok(None)`: a name the
    /// loaded config does not have.
    #[inline(always)]
    pub fn flag_id(&self, snapshot: &Snapshot, term: Term<'_>) -> rustler::NifResult<Option<FlagId>> {
        if let Some(b) = binary_bytes(term) {
            return Ok(snapshot.flag_id(b));
        }
        if term.get_type() == TermType::Atom {
            return Ok(match self.flag_atoms.get(&term.as_c_arg()) {
                Some(id) => Some(*id),
                None => flag_id_by_atom_text(snapshot, term),
            });
        }
        Err(rustler::Error::BadArg)
    }
}

/// A flag named by an atom that is not in `flag_atoms`: an unknown flag, or
/// an atom made after the config was published (publish only takes atoms
/// that exist). Bounded: one atom text of at most `ATOM_BUF` bytes.
#[cold]
#[inline(never)]
fn flag_id_by_atom_text(snapshot: &Snapshot, term: Term<'_>) -> Option<FlagId> {
    let mut buf = [0u8; ATOM_BUF];
    snapshot.flag_id(atom_text(term, &mut buf)?.as_bytes())
}

/// The text of a name given as a binary (UTF-8) or an atom (any), copied;
/// for the non-hot-path NIFs (overrides, explain, configure).
pub fn name_text(term: Term<'_>) -> rustler::NifResult<String> {
    if let Ok(b) = term.decode::<Binary>() {
        return std::str::from_utf8(b.as_slice())
            .map(str::to_owned)
            .map_err(|_| rustler::Error::BadArg);
    }
    let mut buf = [0u8; ATOM_BUF];
    atom_text(term, &mut buf)
        .map(str::to_owned)
        .ok_or(rustler::Error::BadArg)
}

/// An Erlang context map read lazily: only the keys evaluation asks for are
/// looked up (atom keys first, through atoms made once per config; then
/// binary keys). Binaries are borrowed, not copied; atom texts and big
/// integers are decoded into an arena that lives as long as the context.
pub struct MapCtx<'a, 'k> {
    map: Term<'a>,
    empty: bool,
    key_atoms: &'k [KeyAtom],
    arena: RefCell<Vec<Box<[u8]>>>,
    customs: &'k [(Vec<u8>, bool)],
    bad: Cell<bool>,
    /// Foreign values and hash answers; made only off the hot path (one
    /// word here, so the context a hot evaluation builds stays small).
    foreign: OnceCell<Box<Foreign<'a>>>,
}

/// The caller's hash answers, the foreign values read so far and the
/// hashes evaluation asked for and did not have.
struct Foreign<'a> {
    /// `{Term, Hash}` answers from the caller (`erlang:phash2(Term, 2^32)`,
    /// `Term` a foreign value or `{Salt, Value}`).
    hashes: Vec<(Term<'a>, u32)>,
    /// Boxed: evaluation holds references to these while the Vec grows, so
    /// each must keep its address.
    #[allow(clippy::vec_box)]
    values: RefCell<Vec<Box<ErlTerm<'a>>>>,
    wanted: RefCell<Vec<Term<'a>>>,
}

impl<'a> Foreign<'a> {
    fn new(hashes: Vec<(Term<'a>, u32)>) -> Box<Self> {
        Box::new(Foreign {
            hashes,
            values: RefCell::new(Vec::new()),
            wanted: RefCell::new(Vec::new()),
        })
    }
}

/// A context value of a type the core does not read, as a [`ForeignTerm`]:
/// its 27-bit `phash2/1` from the VM, its full hash from the caller's answers.
pub struct ErlTerm<'a> {
    term: Term<'a>,
    /// The context's `Foreign`, boxed: its address is stable while the
    /// context lives, and every `ErlTerm` reference is bounded by a borrow
    /// of the context.
    shared: *const Foreign<'a>,
}

impl fmt::Debug for ErlTerm<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.term)
    }
}

impl ForeignTerm for ErlTerm<'_> {
    fn hash(&self, salt: Option<&[u8]>) -> Option<u32> {
        // SAFETY: see `shared`: the Foreign outlives every ErlTerm reference.
        let shared = unsafe { &*self.shared };
        let env = self.term.get_env();
        let asked = match salt {
            None => self.term,
            Some(s) => rustler::types::tuple::make_tuple(env, &[bytes_term(env, s), self.term]),
        };
        // `==` on terms is `=:=` (enif_is_identical): {1} and {1.0} differ.
        if let Some((_, h)) = shared.hashes.iter().find(|(t, _)| *t == asked) {
            return Some(*h);
        }
        let mut wanted = shared.wanted.borrow_mut();
        if !wanted.contains(&asked) {
            wanted.push(asked);
        }
        None
    }

    fn phash2_27(&self) -> u32 {
        // enif_hash(ERL_NIF_PHASH2, T, 0) is erlang:phash2/1.
        self.term.hash_phash2()
    }
}

impl<'a, 'k> MapCtx<'a, 'k> {
    /// `badarg` unless `map` is a map.
    pub fn new(map: Term<'a>, key_atoms: &'k [KeyAtom], customs: &'k [(Vec<u8>, bool)]) -> rustler::NifResult<Self> {
        let mut size: usize = 0;
        // SAFETY: a valid env and term; enif_get_map_size writes `size` and
        // returns 0 (false) when the term is not a map.
        let is_map = unsafe { enif_get_map_size(map.get_env().as_c_arg(), map.as_c_arg(), &mut size) } != 0;
        if !is_map {
            return Err(rustler::Error::BadArg);
        }
        Ok(MapCtx {
            map,
            empty: size == 0,
            key_atoms,
            arena: RefCell::new(Vec::new()),
            customs,
            bad: Cell::new(false),
            foreign: OnceCell::new(),
        })
    }

    /// With the caller's answers to earlier `{hash, Wanted}` replies.
    pub fn with_hashes(self, hashes: Vec<(Term<'a>, u32)>) -> Self {
        if !hashes.is_empty() {
            let _ = self.foreign.set(Foreign::new(hashes));
        }
        self
    }

    /// The hashes evaluation asked for and did not have (`[]`: complete).
    pub fn wanted(&self) -> Vec<Term<'a>> {
        self.foreign
            .get()
            .map(|f| f.wanted.borrow().clone())
            .unwrap_or_default()
    }

    /// A holder for decoding single terms (no map).
    pub fn holder(term: Term<'a>, key_atoms: &'k [KeyAtom]) -> Self {
        MapCtx {
            map: term,
            empty: true,
            key_atoms,
            arena: RefCell::new(Vec::new()),
            customs: &[],
            bad: Cell::new(false),
            foreign: OnceCell::new(),
        }
    }

    /// Whether evaluation read a value it could not decode (an atom or big
    /// integer the VM would not render): `badarg`. Values of other types
    /// (float, list, tuple, pid, ...) are foreign values, not bad ones.
    pub fn saw_bad_value(&self) -> bool {
        self.bad.get()
    }

    /// `term` as a foreign value, kept as long as the context.
    #[cold]
    fn foreign_value(&self, term: Term<'a>) -> Value<'_> {
        let f = self.foreign.get_or_init(|| Foreign::new(Vec::new()));
        let boxed = Box::new(ErlTerm { term, shared: &**f });
        let ptr: *const ErlTerm<'a> = &*boxed;
        f.values.borrow_mut().push(boxed);
        // SAFETY: the box is owned by `values`, which only grows while `self`
        // lives; moving the Box (or the Vec reallocating) does not move the
        // heap value it points to.
        Value::Foreign(unsafe { &*ptr })
    }

    /// A term as a core [`Value`]: binaries borrowed; atom text and big
    /// integer digits kept in the arena; other types as foreign values.
    /// `None` only for an atom or integer that cannot be decoded.
    ///
    /// Invariant: the binary case is inlined into evaluation (its
    /// `Option<Value>` stays in registers) and the rest kept out of line
    /// (BENCHMARKS.md, "Why the NIF is shaped this way").
    #[inline(always)]
    pub fn value_of(&self, term: Term<'a>) -> Option<Value<'_>> {
        // Binaries first, without asking the type: the common case.
        match binary_bytes(term) {
            Some(b) => Some(Value::Binary(b)),
            None => self.other_value_of(term),
        }
    }

    #[inline(never)]
    fn other_value_of(&self, term: Term<'a>) -> Option<Value<'_>> {
        match term.get_type() {
            TermType::Atom => {
                let mut buf = [0u8; ATOM_BUF];
                let text = atom_text(term, &mut buf)?;
                let kept = self.keep(text.as_bytes().into());
                std::str::from_utf8(kept).ok().map(Value::Atom)
            }
            TermType::Integer => {
                if let Ok(i) = term.decode::<i64>() {
                    return Some(Value::Int(i));
                }
                // A bignum: SMALL_BIG_EXT <<131, 110, N, Sign, Digits:N>> or
                // LARGE_BIG_EXT <<131, 111, N:32, Sign, Digits:N>>, digits little-endian.
                let ext = term.to_binary();
                let (sign, digits) = match ext.as_slice() {
                    [131, 110, n, sign, rest @ ..] => (*sign, rest.get(..usize::from(*n))?),
                    [131, 111, a, b, c, d, sign, rest @ ..] => {
                        let n = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
                        (*sign, rest.get(..n)?)
                    }
                    _ => return None,
                };
                let magnitude = self.keep(digits.into());
                Some(Value::BigInt {
                    negative: sign != 0,
                    magnitude,
                })
            }
            // Any other type (float, tuple, list, map, pid, ...).
            _ => Some(self.foreign_value(term)),
        }
    }

    /// The value under `key` (an atom key, else a binary key). The common
    /// case (a key of the published snapshot, present as an atom) is inlined;
    /// the rest is out of line. Invariant: bare term words all the way, no
    /// multi-word `Option<Term>` returned through memory on the common path.
    #[inline(always)]
    fn lookup(&self, key: &str) -> Option<Term<'a>> {
        if self.empty {
            return None;
        }
        let addr = key.as_ptr() as usize;
        let found = self
            .key_atoms
            .iter()
            .find(|k| k.addr == addr && k.text.len() == key.len());
        let raw = match found {
            Some(k) => match self.get_atom_key(k.atom) {
                Some(v) => Some(v),
                None => self.binary_key(key),
            },
            None => self.other_lookup(key),
        }?;
        // SAFETY: `raw` is a term of this env, read from the map.
        Some(unsafe { Term::new(self.map.get_env(), raw) })
    }

    #[inline(always)]
    fn get_atom_key(&self, a: Atom) -> Option<ErlNifTerm> {
        let env = self.map.get_env();
        let mut value: ErlNifTerm = self.map.as_c_arg();
        // SAFETY: valid env, map and key terms; enif_get_map_value writes
        // `value` and returns non-zero only when the key is present.
        let found = unsafe { enif_get_map_value(env.as_c_arg(), self.map.as_c_arg(), a.as_c_arg(), &mut value) };
        (found != 0).then_some(value)
    }

    /// A key that is not one of the published snapshot's own strings.
    #[inline(never)]
    fn other_lookup(&self, key: &str) -> Option<ErlNifTerm> {
        let atom_key = match self.key_atoms.iter().find(|k| &*k.text == key) {
            Some(k) => Some(k.atom),
            None => Atom::existing_from_utf8_bytes(self.map.get_env(), key.as_bytes()).ok(),
        };
        match atom_key.and_then(|a| self.get_atom_key(a)) {
            Some(v) => Some(v),
            None => self.binary_key(key),
        }
    }

    /// Binary keys: scan (context maps are small flatmaps).
    #[inline(never)]
    fn binary_key(&self, key: &str) -> Option<ErlNifTerm> {
        MapIterator::new(self.map)?.find_map(|(k, v)| {
            let b = k.decode::<Binary>().ok()?;
            (b.as_slice() == key.as_bytes()).then_some(v.as_c_arg())
        })
    }

    /// Keep `bytes` alive as long as the context and borrow them.
    fn keep(&self, bytes: Box<[u8]>) -> &[u8] {
        let ptr: *const [u8] = &*bytes;
        self.arena.borrow_mut().push(bytes);
        // SAFETY: the boxed slice is owned by the arena, which only ever
        // grows while `self` lives: moving the Box into the Vec (or the Vec
        // reallocating) moves the pointer, not the heap bytes it points to.
        unsafe { &*ptr }
    }
}

impl Context for MapCtx<'_, '_> {
    // Invariant: inlined, so the `Option<Value>` stays in registers
    // (BENCHMARKS.md, "Why the NIF is shaped this way").
    #[inline(always)]
    fn get(&self, key: &str) -> Option<Value<'_>> {
        let term = self.lookup(key)?;
        let v = self.value_of(term);
        if v.is_none() {
            self.bad.set(true);
        }
        v
    }

    #[inline(always)]
    fn complete(&self) -> bool {
        self.foreign.get().is_none_or(|f| f.wanted.borrow().is_empty())
    }

    fn custom(&self, name: &str) -> Option<bool> {
        self.customs
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| *v)
    }
}

/// `Set_clock(UnixMs | system) -> ok` for `clock`: pin it, or back to the
/// system clock; `badarg` for anything else (and for the one integer that
/// cannot be pinned, `i64::MIN`).
pub fn set_clock(clock: &PinnableClock, at: Term<'_>) -> rustler::NifResult<Atom> {
    if at.decode::<Atom>().ok() == Some(crate::atoms::system()) {
        clock.unpin();
    } else if !clock.pin(at.decode()?) {
        return Err(rustler::Error::BadArg);
    }
    Ok(crate::atoms::ok())
}

/// The elements of a proper list; `None` for anything else. (rustler 0.39's
/// `Vec<T>` decoding panics on an improper list: check the length first.)
pub fn proper_list(term: Term<'_>) -> Option<Vec<Term<'_>>> {
    term.list_length().ok()?;
    Some(term.into_list_iterator().ok()?.collect())
}

/// Text given as a UTF-8 binary or a charlist (an Erlang string).
pub fn text(term: Term<'_>) -> Option<String> {
    if let Some(bytes) = binary_bytes(term) {
        return std::str::from_utf8(bytes).ok().map(str::to_owned);
    }
    proper_list(term)?
        .into_iter()
        .map(|c| c.decode::<u32>().ok().and_then(char::from_u32))
        .collect()
}
