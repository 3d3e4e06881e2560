//! A tar reader for untrusted layers: ustar, GNU (long names, base-256
//! numbers) and PAX headers, as Go's `archive/tar` reads them for
//! containerd, with every size that decides an allocation bounded first.

use std::io::{self, Read};

/// The largest PAX record set or GNU long name read into memory: Go's
/// `archive/tar` refuses larger ones the same way.
const MAX_SPECIAL: u64 = 1 << 20;
/// The longest path an entry may name.
const MAX_PATH: usize = 4096;
const BLOCK: usize = 512;

/// An error in the archive itself (as opposed to reading it).
#[derive(Debug, thiserror::Error)]
#[error("invalid layer archive: {0}")]
pub(crate) struct Malformed(pub String);

fn malformed(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Malformed(what.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    HardLink,
    Symlink,
    Char,
    Block,
    Directory,
    Fifo,
    /// A PAX global header: containerd ignores it.
    GlobalHeader,
}

/// One entry's header, with PAX and GNU extensions applied.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub kind: Kind,
    /// As the archive spells it (not yet cleaned).
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Only when the archive records one (PAX or GNU).
    pub atime: Option<(i64, u32)>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes (PAX `SCHILY.xattr.*`), in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Reads entries one after another from a tar stream.
pub(crate) struct Reader<R> {
    inner: R,
    /// Content bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's content.
    padding: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    /// The stream behind the archive, to drain what follows it.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry's header; `None` at the end of the archive. The
    /// previous entry's unread content is skipped.
    pub fn next_header(&mut self) -> io::Result<Option<Header>> {
        if self.done {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        loop {
            let mut block = [0u8; BLOCK];
            if !read_block(&mut self.inner, &mut block)? {
                // A stream that simply ends is accepted, as Go does.
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                // The end marker is two zero blocks; Go accepts one.
                let mut second = [0u8; BLOCK];
                let _ = read_block(&mut self.inner, &mut second)?;
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block)?;
            let typeflag = block[156];
            let size = number(&block[124..136], "size")?;
            match typeflag {
                b'L' | b'K' | b'x' => {
                    let data = self.read_special(size, typeflag)?;
                    match typeflag {
                        b'L' => long_name = Some(trim_nul(&data).to_vec()),
                        b'K' => long_link = Some(trim_nul(&data).to_vec()),
                        _ => pax.extend(parse_pax(&data)?),
                    }
                    continue;
                }
                b'g' => {
                    // Global headers apply to nothing containerd keeps.
                    self.read_special(size, typeflag)?;
                    return Ok(Some(Header {
                        kind: Kind::GlobalHeader,
                        name: Vec::new(),
                        link: Vec::new(),
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        size: 0,
                        mtime: (0, 0),
                        atime: None,
                        dev_major: 0,
                        dev_minor: 0,
                        xattrs: Vec::new(),
                    }));
                }
                _ => {}
            }
            let mut header = parse_header(&block, typeflag, size)?;
            if let Some(name) = long_name {
                header.name = name;
            }
            if let Some(link) = long_link {
                header.link = link;
            }
            apply_pax(&mut header, pax)?;
            if header.name.len() > MAX_PATH || header.link.len() > MAX_PATH {
                return Err(malformed("a name longer than 4096 bytes"));
            }
            if header.name.is_empty() {
                return Err(malformed("an entry without a name"));
            }
            // Only regular files carry content: for the other types Go
            // reads no data whatever the size says.
            if header.kind != Kind::Regular {
                header.size = 0;
            }
            self.remaining = header.size;
            self.padding = pad(header.size);
            return Ok(Some(header));
        }
    }

    /// Reads the current entry's content.
    pub fn read_content(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(malformed("the archive ends inside an entry's content"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    fn skip_rest(&mut self) -> io::Result<()> {
        let skip = self.remaining + self.padding;
        if skip > 0 {
            let copied = io::copy(&mut (&mut self.inner).take(skip), &mut io::sink())?;
            if copied < skip {
                return Err(malformed("the archive ends inside an entry"));
            }
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    fn read_special(&mut self, size: u64, typeflag: u8) -> io::Result<Vec<u8>> {
        if size > MAX_SPECIAL {
            return Err(malformed(format!(
                "a '{}' header of {size} bytes (at most {MAX_SPECIAL})",
                typeflag as char
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.inner
            .read_exact(&mut data)
            .map_err(|_| malformed("the archive ends inside an extended header"))?;
        let padding = pad(size);
        io::copy(&mut (&mut self.inner).take(padding), &mut io::sink())?;
        Ok(data)
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Fills `block`; false when the stream ended before its first byte.
fn read_block(r: &mut impl Read, block: &mut [u8; BLOCK]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < BLOCK {
        match r.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(malformed("the archive ends inside a header")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn verify_checksum(block: &[u8; BLOCK]) -> io::Result<()> {
    let recorded = number(&block[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if recorded == unsigned || recorded as i64 == signed {
        Ok(())
    } else {
        Err(malformed("a header whose checksum does not match"))
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match memchr::memchr(0, b) {
        Some(end) => &b[..end],
        None => b,
    }
}

/// An octal field, or GNU's base-256 form (high bit set).
fn number(field: &[u8], what: &str) -> io::Result<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err(malformed(format!("a negative {what}")));
        }
        let mut n: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(u64::from(b)))
                .ok_or_else(|| malformed(format!("a {what} too large")))?;
        }
        return Ok(n);
    }
    let text = trim_nul(field);
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .filter(|&b| b != b' ')
        .collect::<Vec<_>>();
    if digits.is_empty() {
        return Ok(0);
    }
    let mut n: u64 = 0;
    for b in digits {
        if !(b'0'..=b'7').contains(&b) {
            return Err(malformed(format!("a {what} that is not octal")));
        }
        n = n
            .checked_mul(8)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| malformed(format!("a {what} too large")))?;
    }
    Ok(n)
}

fn small(field: &[u8], what: &str) -> io::Result<u32> {
    u32::try_from(number(field, what)?).map_err(|_| malformed(format!("a {what} too large")))
}

fn parse_header(block: &[u8; BLOCK], typeflag: u8, size: u64) -> io::Result<Header> {
    let kind = match typeflag {
        b'0' | 0 | b'7' => Kind::Regular,
        b'1' => Kind::HardLink,
        b'2' => Kind::Symlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'5' => Kind::Directory,
        b'6' => Kind::Fifo,
        b'S' => return Err(malformed("a sparse file (GNU 'S' entry)")),
        other => {
            return Err(malformed(format!(
                "an entry of unhandled type {:?}",
                other as char
            )))
        }
    };
    let magic = &block[257..265];
    let ustar = &magic[..6] == b"ustar\0";
    let gnu = magic == b"ustar  \0";
    let mut name = trim_nul(&block[0..100]).to_vec();
    if ustar {
        let prefix = trim_nul(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let atime = if gnu {
        match number(&block[345..357], "atime")? {
            0 => None,
            t => Some((t as i64, 0)),
        }
    } else {
        None
    };
    let mut kind = kind;
    // Pre-POSIX archives mark directories only by a trailing slash.
    if typeflag == 0 && name.ends_with(b"/") {
        kind = Kind::Directory;
    }
    let (dev_major, dev_minor) = if ustar || gnu {
        (
            small(&block[329..337], "device major")?,
            small(&block[337..345], "device minor")?,
        )
    } else {
        (0, 0)
    };
    Ok(Header {
        kind,
        name,
        link: trim_nul(&block[157..257]).to_vec(),
        mode: (number(&block[100..108], "mode")? & 0o7777) as u32,
        uid: small(&block[108..116], "uid")?,
        gid: small(&block[116..124], "gid")?,
        size,
        mtime: (number(&block[136..148], "mtime")? as i64, 0),
        atime,
        dev_major,
        dev_minor,
        xattrs: Vec::new(),
    })
}

/// PAX records: `"<length> <key>=<value>\n"`, one after another.
fn parse_pax(mut data: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut records = Vec::new();
    while !data.is_empty() {
        let space = memchr::memchr(b' ', data).ok_or_else(|| malformed("a PAX record"))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > space + 1 && l <= data.len())
            .ok_or_else(|| malformed("a PAX record's length"))?;
        let record = &data[space + 1..len];
        let record = record
            .strip_suffix(b"\n")
            .ok_or_else(|| malformed("a PAX record without its newline"))?;
        let eq = memchr::memchr(b'=', record).ok_or_else(|| malformed("a PAX record"))?;
        records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

/// PAX times: decimal seconds with an optional fraction.
fn pax_time(v: &[u8]) -> io::Result<(i64, u32)> {
    let s = std::str::from_utf8(v).map_err(|_| malformed("a PAX time"))?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().map_err(|_| malformed("a PAX time"))?;
    let mut nanos: u32 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("a PAX time"));
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().map_err(|_| malformed("a PAX time"))?;
    }
    if s.starts_with('-') && nanos > 0 {
        // "-1.5" is 1.5 s before the epoch.
        let secs = secs.checked_sub(1).ok_or_else(|| malformed("a PAX time"))?;
        return Ok((secs, 1_000_000_000 - nanos));
    }
    Ok((secs, nanos))
}

fn pax_number(v: &[u8], what: &str) -> io::Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed(format!("a PAX {what}")))
}

fn apply_pax(h: &mut Header, records: Vec<(Vec<u8>, Vec<u8>)>) -> io::Result<()> {
    for (key, value) in records {
        match key.as_slice() {
            b"path" => h.name = value,
            b"linkpath" => h.link = value,
            b"size" => h.size = pax_number(&value, "size")?,
            b"uid" => {
                h.uid = u32::try_from(pax_number(&value, "uid")?)
                    .map_err(|_| malformed("a PAX uid too large"))?
            }
            b"gid" => {
                h.gid = u32::try_from(pax_number(&value, "gid")?)
                    .map_err(|_| malformed("a PAX gid too large"))?
            }
            b"mtime" => h.mtime = pax_time(&value)?,
            b"atime" => h.atime = Some(pax_time(&value)?),
            k if k.starts_with(b"GNU.sparse.") => {
                return Err(malformed("a sparse file (PAX GNU.sparse records)"))
            }
            k if k.starts_with(b"SCHILY.xattr.") => {
                let name = k[b"SCHILY.xattr.".len()..].to_vec();
                // A later record for the same attribute replaces it.
                h.xattrs.retain(|(n, _)| *n != name);
                h.xattrs.push((name, value));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds archives for tests, including ones no honest tool writes.
    #[derive(Default)]
    pub(crate) struct Builder {
        pub out: Vec<u8>,
    }

    pub(crate) struct Entry<'a> {
        pub name: &'a str,
        pub typeflag: u8,
        pub link: &'a str,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub mtime: u64,
        pub data: &'a [u8],
        pub dev: (u32, u32),
        pub pax: Vec<(String, Vec<u8>)>,
    }

    impl Default for Entry<'_> {
        fn default() -> Self {
            Entry {
                name: "",
                typeflag: b'0',
                link: "",
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 1_600_000_000,
                data: b"",
                dev: (0, 0),
                pax: Vec::new(),
            }
        }
    }

    pub(crate) fn header_block(name: &[u8], typeflag: u8, size: u64, e: &Entry<'_>) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        let n = name.len().min(100);
        b[..n].copy_from_slice(&name[..n]);
        let octal = |b: &mut [u8; BLOCK], at: usize, width: usize, v: u64| {
            let s = format!("{:0w$o}\0", v, w = width - 1);
            b[at..at + width].copy_from_slice(s.as_bytes());
        };
        octal(&mut b, 100, 8, u64::from(e.mode));
        octal(&mut b, 108, 8, u64::from(e.uid));
        octal(&mut b, 116, 8, u64::from(e.gid));
        octal(&mut b, 124, 12, size);
        octal(&mut b, 136, 12, e.mtime);
        b[156] = typeflag;
        let l = e.link.len().min(100);
        b[157..157 + l].copy_from_slice(&e.link.as_bytes()[..l]);
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        octal(&mut b, 329, 8, u64::from(e.dev.0));
        octal(&mut b, 337, 8, u64::from(e.dev.1));
        b[148..156].copy_from_slice(b"        ");
        let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
        let s = format!("{:06o}\0 ", sum);
        b[148..156].copy_from_slice(s.as_bytes());
        b
    }

    impl Builder {
        pub fn raw(&mut self, block: &[u8], data: &[u8]) -> &mut Self {
            self.out.extend_from_slice(block);
            self.out.extend_from_slice(data);
            self.out
                .resize(self.out.len() + pad(data.len() as u64) as usize, 0);
            self
        }

        pub fn entry(&mut self, e: Entry<'_>) -> &mut Self {
            if !e.pax.is_empty() {
                let mut records = Vec::new();
                for (k, v) in &e.pax {
                    let body_len = k.len() + v.len() + 3;
                    let mut len = body_len + 1;
                    while format!("{len}").len() + body_len != len {
                        len += 1;
                    }
                    records.extend_from_slice(format!("{len} {k}=").as_bytes());
                    records.extend_from_slice(v);
                    records.push(b'\n');
                }
                let block = header_block(b"PaxHeader", b'x', records.len() as u64, &e);
                self.raw(&block, &records);
            }
            let block = header_block(e.name.as_bytes(), e.typeflag, e.data.len() as u64, &e);
            self.raw(&block, e.data)
        }

        pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            self.entry(Entry {
                name,
                data,
                ..Default::default()
            })
        }

        pub fn dir(&mut self, name: &str) -> &mut Self {
            self.entry(Entry {
                name,
                typeflag: b'5',
                mode: 0o755,
                ..Default::default()
            })
        }

        pub fn finish(&mut self) -> Vec<u8> {
            self.out.extend_from_slice(&[0u8; 2 * BLOCK]);
            std::mem::take(&mut self.out)
        }
    }

    fn headers(archive: &[u8]) -> io::Result<Vec<Header>> {
        let mut r = Reader::new(archive);
        let mut out = Vec::new();
        while let Some(h) = r.next_header()? {
            out.push(h);
        }
        Ok(out)
    }

    #[test]
    fn reads_names_types_and_content_with_pax_overrides() {
        let long = format!("{}/file", "d".repeat(200));
        let archive = Builder::default()
            .dir("a/")
            .file("a/x", b"hello")
            .entry(Entry {
                name: "ignored",
                pax: vec![
                    ("path".into(), long.clone().into_bytes()),
                    ("mtime".into(), b"1700000000.25".to_vec()),
                    ("SCHILY.xattr.user.k".into(), b"v\0w".to_vec()),
                ],
                data: b"xyz",
                ..Default::default()
            })
            .finish();
        let mut r = Reader::new(archive.as_slice());
        let a = r.next_header().unwrap().unwrap();
        assert_eq!((a.kind, a.name.as_slice()), (Kind::Directory, &b"a/"[..]));
        let x = r.next_header().unwrap().unwrap();
        let mut buf = [0u8; 16];
        let n = r.read_content(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let l = r.next_header().unwrap().unwrap();
        assert_eq!(l.name, long.as_bytes());
        assert_eq!(l.mtime, (1_700_000_000, 250_000_000));
        assert_eq!(l.xattrs, vec![(b"user.k".to_vec(), b"v\0w".to_vec())]);
        assert_eq!(x.size, 5);
        assert!(r.next_header().unwrap().is_none());
    }

    #[test]
    fn oversized_extended_headers_are_refused_before_any_allocation() {
        let e = Entry::default();
        let block = header_block(b"PaxHeader", b'x', 1 << 32, &e);
        let mut archive = block.to_vec();
        archive.extend_from_slice(&[0u8; 1024]);
        let err = headers(&archive).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[4] = 0x01;
        let mut block = header_block(b"PaxHeader", b'x', 0, &e);
        block[124..136].copy_from_slice(&field);
        block[148..156].copy_from_slice(b"        ");
        let sum: u64 = block.iter().map(|&x| u64::from(x)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let err = headers(&block).unwrap_err();
        assert!(
            err.to_string().contains("at most"),
            "a base-256 size: {err}"
        );
        let block = header_block(b"././@LongLink", b'L', (1 << 20) + 1, &e);
        let err = headers(&block).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn truncated_and_corrupt_archives_are_errors_not_short_layers() {
        let archive = Builder::default().file("f", &[7u8; 2000]).finish();
        let mut cut = Reader::new(&archive[..1000]);
        cut.next_header().unwrap();
        let mut sink = Vec::new();
        let err = loop {
            let mut buf = [0u8; 256];
            match cut.read_content(&mut buf) {
                Ok(0) => panic!("a truncated entry read to its end"),
                Ok(n) => sink.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("ends inside"), "{err}");
        let mut bad = archive.clone();
        bad[10] ^= 1;
        let err = headers(&bad).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = headers(&archive[..300]).unwrap_err();
        assert!(err.to_string().contains("inside a header"), "{err}");
    }

    #[test]
    fn sparse_files_and_bad_pax_records_are_refused() {
        let e = Entry::default();
        let err = headers(
            &Builder::default()
                .raw(&header_block(b"s", b'S', 0, &e), b"")
                .finish(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("sparse"), "{err}");
        let block = header_block(b"PaxHeader", b'x', 9, &e);
        let err = headers(&Builder::default().raw(&block, b"99 path=x").finish()).unwrap_err();
        assert!(err.to_string().contains("PAX"), "{err}");
    }

    proptest::proptest! {
        /// Whatever the bytes, reading them ends in entries or an error,
        /// never a panic; and so with a valid archive's bytes flipped.
        #[test]
        fn no_bytes_make_the_reader_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let _ = headers(&data);
        }

        #[test]
        fn no_corruption_of_an_archive_makes_the_reader_panic(at in 0usize..3584, byte in proptest::prelude::any::<u8>()) {
            let mut archive = Builder::default()
                .entry(Entry { name: "p", pax: vec![("path".into(), b"long/name".to_vec())], data: b"x", ..Default::default() })
                .file("f", &[1u8; 700])
                .finish();
            let at = at % archive.len();
            archive[at] = byte;
            let _ = headers(&archive);
        }
    }

    #[test]
    fn base256_numbers_and_negative_pax_times_decode() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[11] = 0x01;
        field[10] = 0x02;
        assert_eq!(number(&field, "size").unwrap(), 0x0201);
        assert_eq!(pax_time(b"-1.5").unwrap(), (-2, 500_000_000));
        assert_eq!(pax_time(b"-0.25").unwrap(), (-1, 750_000_000));
        assert!(pax_time(b"-9223372036854775808.5").is_err());
    }
}
