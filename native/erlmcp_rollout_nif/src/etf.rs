//! Session metadata in Erlang's external term format, written by the NIF
//! itself, so that `erlmcp_session_native:store/3` needs no
//! `term_to_binary/1` and no intermediate binary.
//!
//! Invariant: the bytes are exactly those the running VM's
//! `term_to_binary/1` writes for the same term, so a session stored by this
//! encoder and one stored by the Erlang fallback (or by another node, or a
//! legacy import) hold the same bytes, and `verify` and the Merkle digests
//! compare equal. The one thing that differs between OTP releases is how
//! atoms are tagged: up to OTP 25 latin-1 atoms are `ATOM_EXT`, from OTP 26
//! every atom is `SMALL_ATOM_UTF8_EXT` (or `ATOM_UTF8_EXT` when its UTF-8
//! text is over 255 bytes). [`probe_atom_tags`] asks the VM's own encoder
//! (`enif_term_to_binary`) at load time which one it writes; no version
//! string is parsed. Lists of bytes are `STRING_EXT` and small maps are
//! written in the VM's internal key order on every release in the matrix.
//!
//! Everything else is declined with [`NotHere`] and the caller encodes with
//! `term_to_binary/1`: pids, ports, references, funs, integers beyond 64
//! bits, bitstrings, atoms beyond latin-1 (NIF version 2.16 reads atom text
//! as latin-1 only), maps over 32 keys (their internal order is the VM's),
//! terms nested deeper than [`MAX_DEPTH`] and encodings over [`MAX_LEN`]
//! bytes (that BIF yields; a NIF on a normal scheduler must stay short).

use rustler::sys::{
    c_char, c_int, c_uint, enif_get_atom, enif_get_double, enif_get_int64, enif_get_list_cell, enif_get_map_size,
    enif_get_tuple, enif_get_uint64, enif_inspect_binary, enif_is_empty_list, enif_map_iterator_create,
    enif_map_iterator_destroy, enif_map_iterator_get_pair, enif_map_iterator_next, enif_term_type, ErlNifBinary,
    ErlNifCharEncoding, ErlNifEnv, ErlNifMapIterator, ErlNifMapIteratorEntry, ErlNifTerm, ErlNifTermType,
};
use rustler::{Encoder, Env, Term};
use std::sync::atomic::{AtomicBool, Ordering};

/// Longest encoding written here, in bytes.
pub const MAX_LEN: usize = 64 * 1024;

/// Deepest nesting written here (a recursion bound as well).
pub const MAX_DEPTH: u32 = 64;

/// Most keys of a map written here: the VM keeps maps up to this size as
/// sorted arrays and encodes their pairs in that order.
const MAX_FLAT_MAP: usize = 32;

/// `term_to_binary/1` has to encode this term (see the module doc).
#[derive(Debug, PartialEq, Eq)]
pub struct NotHere;

const VERSION: u8 = 131;
const NEW_FLOAT_EXT: u8 = 70;
const SMALL_INTEGER_EXT: u8 = 97;
const INTEGER_EXT: u8 = 98;
const ATOM_EXT: u8 = 100;
const ATOM_UTF8_EXT: u8 = 118;
const SMALL_ATOM_UTF8_EXT: u8 = 119;
const SMALL_TUPLE_EXT: u8 = 104;
const LARGE_TUPLE_EXT: u8 = 105;
const NIL_EXT: u8 = 106;
const STRING_EXT: u8 = 107;
const LIST_EXT: u8 = 108;
const BINARY_EXT: u8 = 109;
const SMALL_BIG_EXT: u8 = 110;
const MAP_EXT: u8 = 116;

/// Longest list `term_to_binary/1` writes as `STRING_EXT`.
const MAX_STRING_EXT: usize = 65_535;

/// Whether this VM's `term_to_binary/1` tags atoms as UTF-8 (OTP 26 and
/// later). Set once by [`probe_atom_tags`] in the load callback, before any
/// NIF can run; read by every encoder.
static UTF8_ATOMS: AtomicBool = AtomicBool::new(false);

/// Asks the VM's own encoder how it writes a latin-1 atom and makes this
/// module write the same. Returns `false` (the load then fails) for a tag
/// this module does not know, rather than writing bytes that differ.
pub fn probe_atom_tags(env: Env<'_>) -> bool {
    let bytes = crate::atoms::ok().encode(env).to_binary();
    match bytes.as_slice() {
        [VERSION, ATOM_EXT, ..] => UTF8_ATOMS.store(false, Ordering::Relaxed),
        [VERSION, SMALL_ATOM_UTF8_EXT, ..] => UTF8_ATOMS.store(true, Ordering::Relaxed),
        _ => return false,
    }
    true
}

/// A scheduler thread's encoder: its output buffer (reused call after
/// call; at most [`MAX_LEN`] and a few hundred bytes) and the encodings of
/// the atoms it met last.
#[derive(Default)]
pub struct Scratch {
    out: Vec<u8>,
    atoms: AtomCache,
}

impl Scratch {
    /// Writes `term` in external term format; returns the bytes.
    ///
    /// # Errors
    /// [`NotHere`] for a term to encode with `term_to_binary/1` instead.
    pub fn encode(&mut self, term: Term<'_>) -> Result<&[u8], NotHere> {
        self.out.clear();
        self.out.push(VERSION);
        let mut w = Writer {
            env: term.get_env().as_c_arg(),
            out: &mut self.out,
            atoms: &mut self.atoms,
        };
        w.term(term.as_c_arg(), 0)?;
        Ok(&self.out)
    }
}

/// Atom encodings by atom term: an atom's term is the same word for the
/// VM's lifetime (atoms are never freed), so a hit needs no check beyond
/// the word. Direct-mapped on the atom index bits; a slot holds its
/// encoding's length and then the encoding (tag, length, text), for
/// encodings of up to `ATOM_SLOT - 1` bytes.
struct AtomCache {
    slots: Box<[(usize, [u8; ATOM_SLOT])]>,
}

const ATOM_SLOTS: usize = 64;
const ATOM_SLOT: usize = 32;

impl Default for AtomCache {
    fn default() -> Self {
        // Word 0 is no atom's term (an atom's tag bits are not zero).
        AtomCache {
            slots: vec![(0, [0; ATOM_SLOT]); ATOM_SLOTS].into_boxed_slice(),
        }
    }
}

impl AtomCache {
    fn slot(&mut self, word: usize) -> &mut (usize, [u8; ATOM_SLOT]) {
        // An atom term is its index shifted over a 6-bit tag.
        let i = (word >> 6) % ATOM_SLOTS;
        &mut self.slots[i]
    }
}

struct Writer<'o> {
    env: *mut ErlNifEnv,
    out: &'o mut Vec<u8>,
    atoms: &'o mut AtomCache,
}

impl Writer<'_> {
    fn room(&self, more: usize) -> Result<(), NotHere> {
        if self.out.len().saturating_add(more) > MAX_LEN {
            return Err(NotHere);
        }
        Ok(())
    }

    fn term(&mut self, t: ErlNifTerm, depth: u32) -> Result<(), NotHere> {
        if depth > MAX_DEPTH {
            return Err(NotHere);
        }
        self.room(16)?;
        // SAFETY (every enif call below): `env` is the env of the NIF call
        // in progress and `t` one of its terms or a part of one.
        match unsafe { enif_term_type(self.env, t) } {
            ErlNifTermType::ERL_NIF_TERM_TYPE_ATOM => self.atom(t),
            ErlNifTermType::ERL_NIF_TERM_TYPE_BITSTRING => self.binary(t),
            ErlNifTermType::ERL_NIF_TERM_TYPE_INTEGER => self.integer(t),
            ErlNifTermType::ERL_NIF_TERM_TYPE_FLOAT => {
                let mut f = 0.0;
                if unsafe { enif_get_double(self.env, t, &mut f) } == 0 {
                    return Err(NotHere);
                }
                self.out.push(NEW_FLOAT_EXT);
                self.out.extend_from_slice(&f.to_bits().to_be_bytes());
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_LIST => self.list(t, depth),
            ErlNifTermType::ERL_NIF_TERM_TYPE_TUPLE => self.tuple(t, depth),
            ErlNifTermType::ERL_NIF_TERM_TYPE_MAP => self.map(t, depth),
            _ => Err(NotHere),
        }
    }

    fn atom(&mut self, t: ErlNifTerm) -> Result<(), NotHere> {
        // SAFETY: ErlNifTerm is a transparent word.
        let word = unsafe { std::mem::transmute::<ErlNifTerm, usize>(t) };
        let slot = self.atoms.slot(word);
        if slot.0 == word {
            // A cached encoding: its length byte is slot.1[0].
            let len = usize::from(slot.1[0]);
            self.out.extend_from_slice(&slot.1[1..=len]);
            return Ok(());
        }
        // 255 latin-1 characters and the NUL enif_get_atom adds.
        let mut text = std::mem::MaybeUninit::<[u8; 256]>::uninit();
        let n = unsafe {
            enif_get_atom(
                self.env,
                t,
                text.as_mut_ptr() as *mut c_char,
                256 as c_uint,
                ErlNifCharEncoding::ERL_NIF_LATIN1,
            )
        };
        // 0: characters beyond latin-1 (not readable with NIF version 2.16).
        let len = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).ok_or(NotHere)?;
        // SAFETY: enif_get_atom wrote `n` bytes (the text and a NUL).
        let text = unsafe { std::slice::from_raw_parts(text.as_ptr() as *const u8, len) };
        // `room`, on the field: `slot` borrows the atom cache.
        if self.out.len() + 3 + 2 * len > MAX_LEN {
            return Err(NotHere);
        }
        let at = self.out.len();
        if UTF8_ATOMS.load(Ordering::Relaxed) {
            // Latin-1 characters >= 0x80 take two UTF-8 bytes.
            let utf8_len = len + text.iter().filter(|&&c| c >= 0x80).count();
            if let Ok(short) = u8::try_from(utf8_len) {
                self.out.extend_from_slice(&[SMALL_ATOM_UTF8_EXT, short]);
            } else {
                self.out.push(ATOM_UTF8_EXT);
                self.out.extend_from_slice(&(utf8_len as u16).to_be_bytes());
            }
            for &c in text {
                if c < 0x80 {
                    self.out.push(c);
                } else {
                    self.out.extend_from_slice(&[0xC0 | (c >> 6), 0x80 | (c & 0x3F)]);
                }
            }
        } else {
            self.out.push(ATOM_EXT);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
            self.out.extend_from_slice(text);
        }
        let written = self.out.len() - at;
        if written < ATOM_SLOT {
            slot.0 = word;
            slot.1[0] = written as u8;
            slot.1[1..=written].copy_from_slice(&self.out[at..]);
        }
        Ok(())
    }

    fn binary(&mut self, t: ErlNifTerm) -> Result<(), NotHere> {
        let mut bin = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
        // Fails for a bitstring that is not a whole number of bytes.
        if unsafe { enif_inspect_binary(self.env, t, bin.as_mut_ptr()) } == 0 {
            return Err(NotHere);
        }
        // SAFETY: filled by the successful call above.
        let bin = unsafe { bin.assume_init() };
        self.room(bin.size.saturating_add(5))?;
        self.out.push(BINARY_EXT);
        self.out
            .extend_from_slice(&u32::try_from(bin.size).map_err(|_| NotHere)?.to_be_bytes());
        if bin.size > 0 {
            // SAFETY: `size` bytes at `data`, valid while the term is.
            self.out
                .extend_from_slice(unsafe { std::slice::from_raw_parts(bin.data, bin.size) });
        }
        Ok(())
    }

    fn integer(&mut self, t: ErlNifTerm) -> Result<(), NotHere> {
        let mut i: i64 = 0;
        if unsafe { enif_get_int64(self.env, t, &mut i) } != 0 {
            if let Ok(b) = u8::try_from(i) {
                self.out.extend_from_slice(&[SMALL_INTEGER_EXT, b]);
            } else if let Ok(w) = i32::try_from(i) {
                self.out.push(INTEGER_EXT);
                self.out.extend_from_slice(&w.to_be_bytes());
            } else {
                self.big(i < 0, i.unsigned_abs());
            }
            return Ok(());
        }
        let mut u: u64 = 0;
        if unsafe { enif_get_uint64(self.env, t, &mut u) } != 0 {
            self.big(false, u);
            return Ok(());
        }
        Err(NotHere)
    }

    /// `SMALL_BIG_EXT`: digit bytes little-endian, no leading zero bytes.
    fn big(&mut self, negative: bool, magnitude: u64) {
        let n = (64 - magnitude.leading_zeros()).div_ceil(8) as usize;
        self.out
            .extend_from_slice(&[SMALL_BIG_EXT, n as u8, u8::from(negative)]);
        self.out.extend_from_slice(&magnitude.to_le_bytes()[..n]);
    }

    fn list(&mut self, t: ErlNifTerm, depth: u32) -> Result<(), NotHere> {
        if unsafe { enif_is_empty_list(self.env, t) } != 0 {
            self.out.push(NIL_EXT);
            return Ok(());
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[LIST_EXT, 0, 0, 0, 0]);
        let mut count: usize = 0;
        // Whether every element so far is an integer 0..=255 (written as
        // SMALL_INTEGER_EXT): then the list may become a STRING_EXT.
        let mut bytes = true;
        let (mut head, mut rest) = (t, t);
        while unsafe { enif_get_list_cell(self.env, rest, &mut head, &mut rest) } != 0 {
            let at = self.out.len();
            self.term(head, depth + 1)?;
            bytes = bytes && self.out.len() == at + 2 && self.out[at] == SMALL_INTEGER_EXT;
            count += 1;
        }
        let count32 = u32::try_from(count).map_err(|_| NotHere)?;
        self.out[start + 1..start + 5].copy_from_slice(&count32.to_be_bytes());
        if unsafe { enif_is_empty_list(self.env, rest) } != 0 {
            // A proper list.
            if bytes && count <= MAX_STRING_EXT {
                // <<107, Len:16, Bytes/binary>> in place of the elements.
                let elements = start + 5;
                self.out[start] = STRING_EXT;
                self.out[start + 1..start + 3].copy_from_slice(&(count as u16).to_be_bytes());
                for k in 0..count {
                    self.out[start + 3 + k] = self.out[elements + 2 * k + 1];
                }
                self.out.truncate(start + 3 + count);
                return Ok(());
            }
            self.out.push(NIL_EXT);
            return Ok(());
        }
        // An improper list: the tail is written last.
        self.term(rest, depth + 1)
    }

    fn tuple(&mut self, t: ErlNifTerm, depth: u32) -> Result<(), NotHere> {
        let mut arity: c_int = 0;
        let mut elements: *const ErlNifTerm = std::ptr::null();
        if unsafe { enif_get_tuple(self.env, t, &mut arity, &mut elements) } == 0 {
            return Err(NotHere);
        }
        let arity = usize::try_from(arity).map_err(|_| NotHere)?;
        if let Ok(a) = u8::try_from(arity) {
            self.out.extend_from_slice(&[SMALL_TUPLE_EXT, a]);
        } else {
            self.out.push(LARGE_TUPLE_EXT);
            self.out.extend_from_slice(&(arity as u32).to_be_bytes());
        }
        for k in 0..arity {
            // SAFETY: `arity` elements at `elements`, valid while the tuple is.
            self.term(unsafe { *elements.add(k) }, depth + 1)?;
        }
        Ok(())
    }

    fn map(&mut self, t: ErlNifTerm, depth: u32) -> Result<(), NotHere> {
        let mut size = 0;
        if unsafe { enif_get_map_size(self.env, t, &mut size) } == 0 || size > MAX_FLAT_MAP {
            return Err(NotHere);
        }
        self.out.push(MAP_EXT);
        self.out.extend_from_slice(&(size as u32).to_be_bytes());
        if size == 0 {
            return Ok(());
        }
        let mut iter = std::mem::MaybeUninit::<ErlNifMapIterator>::uninit();
        if unsafe {
            enif_map_iterator_create(
                self.env,
                t,
                iter.as_mut_ptr(),
                ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_HEAD,
            )
        } == 0
        {
            return Err(NotHere);
        }
        let iter = iter.as_mut_ptr();
        let mut result = Ok(());
        let (mut k, mut v) = (t, t);
        while unsafe { enif_map_iterator_get_pair(self.env, iter, &mut k, &mut v) } != 0 {
            result = self.term(k, depth + 1).and_then(|()| self.term(v, depth + 1));
            if result.is_err() {
                break;
            }
            unsafe { enif_map_iterator_next(self.env, iter) };
        }
        unsafe { enif_map_iterator_destroy(self.env, iter) };
        result
    }
}
