//! Packing passwd and group entries into the caller's buffer, without `unsafe`: the buffer is
//! a byte slice, strings are copied in with their NUL, pointers are written as address bytes.
//! Every step checks the remaining space; running out is [`PackError::Range`] (glibc retries
//! with a bigger buffer).
#![forbid(unsafe_code)]

use kmsbastion::passwd::{GroupEntry, PasswdEntry};
use libc::c_char;
use std::mem::{align_of, size_of};

/// Why an entry could not be packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackError {
    /// The buffer is too small (`ERANGE`).
    Range,
    /// A field contains a NUL byte or a newline; such an entry is never produced.
    BadField,
}

/// The C `struct passwd` fields, as addresses into the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedPasswd {
    pub name: *mut c_char,
    pub passwd: *mut c_char,
    pub gecos: *mut c_char,
    pub dir: *mut c_char,
    pub shell: *mut c_char,
}

/// The C `struct group` fields, as addresses into the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedGroup {
    pub name: *mut c_char,
    pub passwd: *mut c_char,
    pub mem: *mut *mut c_char,
}

struct Packer<'a> {
    buf: &'a mut [u8],
    used: usize,
}

impl Packer<'_> {
    fn reserve(&mut self, len: usize) -> Result<(usize, *mut u8), PackError> {
        let start = self.used;
        let end = start.checked_add(len).ok_or(PackError::Range)?;
        let region = self.buf.get_mut(start..end).ok_or(PackError::Range)?;
        self.used = end;
        Ok((start, region.as_mut_ptr()))
    }

    fn string(&mut self, s: &str) -> Result<*mut c_char, PackError> {
        if s.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(PackError::BadField);
        }
        let (start, ptr) = self.reserve(s.len() + 1)?;
        let region = self
            .buf
            .get_mut(start..start + s.len() + 1)
            .ok_or(PackError::Range)?;
        let (body, nul) = region.split_at_mut(s.len());
        body.copy_from_slice(s.as_bytes());
        nul.fill(0);
        Ok(ptr.cast())
    }

    /// Reserves an aligned array of `n` pointers; returns its offset and address.
    fn pointer_array(&mut self, n: usize) -> Result<(usize, *mut *mut c_char), PackError> {
        let here = self.buf.as_ptr() as usize + self.used;
        let align = align_of::<*mut c_char>();
        let pad = (align - here % align) % align;
        self.reserve(pad)?;
        let bytes = n
            .checked_mul(size_of::<*mut c_char>())
            .ok_or(PackError::Range)?;
        let (start, ptr) = self.reserve(bytes)?;
        Ok((start, ptr.cast()))
    }

    fn write_pointer(
        &mut self,
        array_start: usize,
        index: usize,
        p: *mut c_char,
    ) -> Result<(), PackError> {
        let w = size_of::<*mut c_char>();
        let at = array_start + index * w;
        let slot = self.buf.get_mut(at..at + w).ok_or(PackError::Range)?;
        slot.copy_from_slice(&(p as usize).to_ne_bytes());
        Ok(())
    }
}

/// Packs a passwd entry's strings into `buf`.
pub fn pack_passwd(e: &PasswdEntry, buf: &mut [u8]) -> Result<PackedPasswd, PackError> {
    let mut p = Packer { buf, used: 0 };
    Ok(PackedPasswd {
        name: p.string(&e.name)?,
        passwd: p.string(&e.passwd)?,
        gecos: p.string(&e.gecos)?,
        dir: p.string(&e.dir)?,
        shell: p.string(&e.shell)?,
    })
}

/// Packs a group entry's strings and its NULL-terminated member array into `buf`.
pub fn pack_group(g: &GroupEntry, buf: &mut [u8]) -> Result<PackedGroup, PackError> {
    let mut p = Packer { buf, used: 0 };
    let name = p.string(&g.name)?;
    let passwd = p.string(&g.passwd)?;
    let slots = g.members.len().checked_add(1).ok_or(PackError::Range)?;
    let (array_start, mem) = p.pointer_array(slots)?;
    for (i, m) in g.members.iter().enumerate() {
        let s = p.string(m)?;
        p.write_pointer(array_start, i, s)?;
    }
    p.write_pointer(array_start, g.members.len(), std::ptr::null_mut())?;
    Ok(PackedGroup { name, passwd, mem })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn entry() -> PasswdEntry {
        PasswdEntry {
            name: "alice@root@web-01".into(),
            passwd: "*".into(),
            uid: 64001,
            gid: 64000,
            gecos: "kmsbastion alice -> root@web-01".into(),
            dir: "/".into(),
            shell: "/usr/libexec/kmsbastion/kmsbastion-connect".into(),
        }
    }

    fn needed(e: &PasswdEntry) -> usize {
        [&e.name, &e.passwd, &e.gecos, &e.dir, &e.shell]
            .iter()
            .map(|s| s.len() + 1)
            .sum()
    }

    #[test]
    fn passwd_fits_exactly_or_reports_range() {
        let e = entry();
        let n = needed(&e);
        for len in 0..n {
            let mut buf = vec![0u8; len];
            assert_eq!(
                pack_passwd(&e, &mut buf),
                Err(PackError::Range),
                "len {len}"
            );
        }
        let mut buf = vec![0xffu8; n];
        let base = buf.as_ptr() as usize;
        let packed = pack_passwd(&e, &mut buf).unwrap();
        assert_eq!(packed.name as usize, base);
        let text: Vec<&[u8]> = buf.split(|&b| b == 0).collect();
        assert_eq!(text[0], e.name.as_bytes());
        assert_eq!(text[2], e.gecos.as_bytes());
        assert_eq!(text[4], e.shell.as_bytes());
    }

    #[test]
    fn refuses_nul_and_newline() {
        let mut e = entry();
        e.gecos = "a\nb".into();
        assert_eq!(pack_passwd(&e, &mut [0u8; 256]), Err(PackError::BadField));
        e.gecos = "a\0b".into();
        assert_eq!(pack_passwd(&e, &mut [0u8; 256]), Err(PackError::BadField));
    }

    #[test]
    fn group_members_array() {
        let g = GroupEntry {
            name: "kmsbastion-engineers".into(),
            passwd: "*".into(),
            gid: 64000,
            members: vec!["alice".into(), "bob".into()],
        };
        // Offset the buffer by one byte so the pointer array needs padding.
        let mut storage = vec![0u8; 257];
        let buf = &mut storage[1..];
        let packed = pack_group(&g, buf).unwrap();
        assert_eq!(packed.mem as usize % align_of::<*mut c_char>(), 0);
        let w = size_of::<usize>();
        let off = packed.mem as usize - buf.as_ptr() as usize;
        let read = |i: usize| {
            usize::from_ne_bytes(buf[off + i * w..off + (i + 1) * w].try_into().unwrap())
        };
        let a = read(0) - buf.as_ptr() as usize;
        assert_eq!(&buf[a..a + 6], b"alice\0");
        let b = read(1) - buf.as_ptr() as usize;
        assert_eq!(&buf[b..b + 4], b"bob\0");
        assert_eq!(read(2), 0);
        for len in 0..40 {
            assert_eq!(
                pack_group(&g, &mut vec![0u8; len]),
                Err(PackError::Range),
                "len {len}"
            );
        }
    }
}
