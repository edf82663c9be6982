//! Test helpers: guest memory, temporary files and hand-built kernel images.

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use crate::layout;

/// Load and entry address of the test PVH ELF.
pub(super) const PVH_ENTRY: u64 = 0x10_0000;
/// Size of the synthetic bzImage's protected-mode part.
const BZIMAGE_PAYLOAD_SIZE: usize = 0x1000;

/// Anonymous guest memory laid out as `layout::ram_ranges(size)`.
pub(super) fn guest_memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), usize::try_from(len).unwrap()))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// A temporary file holding `bytes`, removed when dropped.
pub(super) fn temp_file(bytes: &[u8]) -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/vmm-boot-test").unwrap();
    std::fs::write(file.as_path(), bytes).unwrap();
    file
}

/// An ELF note: name (without NUL), type, descriptor.
pub(super) struct ElfNote<'a> {
    pub(super) name: &'a [u8],
    pub(super) kind: u32,
    pub(super) desc: &'a [u8],
}

/// A minimal ELF64 executable: one PT_LOAD of `code` at `PVH_ENTRY`, and a PT_NOTE with
/// `note` if given.
pub(super) fn elf_image(code: &[u8], note: Option<ElfNote>) -> Vec<u8> {
    const EHDR_SIZE: usize = 64;
    const PHDR_SIZE: usize = 56;
    const CODE_OFFSET: usize = 0x100;
    let note_bytes = note.map(|note| {
        let mut bytes = Vec::new();
        let name_len = note.name.len() + 1;
        bytes.extend_from_slice(&u32::try_from(name_len).unwrap().to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(note.desc.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(&note.kind.to_le_bytes());
        bytes.extend_from_slice(note.name);
        bytes.resize(12 + name_len.next_multiple_of(4), 0);
        bytes.extend_from_slice(note.desc);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    });
    let phnum: u16 = if note_bytes.is_some() { 2 } else { 1 };
    let note_offset = EHDR_SIZE + PHDR_SIZE * usize::from(phnum);

    let mut image = Vec::new();
    image.extend_from_slice(b"\x7fELF\x02\x01\x01");
    image.resize(16, 0);
    image.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    image.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    image.extend_from_slice(&1u32.to_le_bytes()); // e_version
    image.extend_from_slice(&PVH_ENTRY.to_le_bytes()); // e_entry
    image.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    image.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    image.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    image.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    image.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    image.extend_from_slice(&phnum.to_le_bytes());
    image.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    let code_len = code.len() as u64;
    push_phdr(&mut image, 1, 5, CODE_OFFSET as u64, PVH_ENTRY, code_len);
    if let Some(note_bytes) = &note_bytes {
        push_phdr(
            &mut image,
            4,
            4,
            note_offset as u64,
            0,
            note_bytes.len() as u64,
        );
        image.extend_from_slice(note_bytes);
    }
    assert!(image.len() <= CODE_OFFSET);
    image.resize(CODE_OFFSET, 0);
    image.extend_from_slice(code);
    image
}

fn push_phdr(image: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, size: u64) {
    image.extend_from_slice(&kind.to_le_bytes());
    image.extend_from_slice(&flags.to_le_bytes());
    for value in [offset, addr, addr, size, size, 0x1000] {
        image.extend_from_slice(&value.to_le_bytes());
    }
}

/// An ELF with a PVH note whose entry is `PVH_ENTRY`, the start of `code`.
pub(super) fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let entry = u32::try_from(PVH_ENTRY).unwrap().to_le_bytes();
    elf_image(
        code,
        Some(ElfNote {
            name: b"Xen",
            kind: 18,
            desc: &entry,
        }),
    )
}

/// An ELF whose only note is a GNU build id.
pub(super) fn elf_without_pvh_note() -> Vec<u8> {
    elf_image(
        &[0xf4],
        Some(ElfNote {
            name: b"GNU",
            kind: 3,
            desc: &[0x5a; 20],
        }),
    )
}

/// Header values of a synthetic bzImage.
#[derive(Debug, Clone)]
pub(super) struct BzImageSpec {
    pub(super) version: u16,
    pub(super) xloadflags: u16,
    pub(super) relocatable: bool,
    pub(super) pref_address: u64,
    pub(super) initrd_addr_max: u32,
    pub(super) init_size: u32,
    /// Code placed at the 64-bit entry (protected-mode part offset 0x200).
    pub(super) code64: Vec<u8>,
}

impl Default for BzImageSpec {
    fn default() -> Self {
        Self {
            version: 0x020f,
            xloadflags: 1,
            relocatable: false,
            pref_address: 0x100_0000,
            initrd_addr_max: 0x7fff_ffff,
            init_size: 0x2_0000,
            code64: vec![0xf4],
        }
    }
}

/// A bzImage-shaped file: one setup sector after the boot sector, then a 4 KiB payload.
pub(super) fn synthetic_bzimage(spec: &BzImageSpec) -> Vec<u8> {
    let header = setup_header {
        setup_sects: 1,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version: spec.version,
        loadflags: 0x01,
        code32_start: 0x10_0000,
        initrd_addr_max: spec.initrd_addr_max,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: u8::from(spec.relocatable),
        xloadflags: spec.xloadflags,
        cmdline_size: 2047,
        pref_address: spec.pref_address,
        init_size: spec.init_size,
        ..Default::default()
    };
    let mut image = vec![0u8; 1024];
    image[0x1f1..0x1f1 + header.as_slice().len()].copy_from_slice(header.as_slice());
    let mut payload = vec![0u8; BZIMAGE_PAYLOAD_SIZE];
    payload[0x200..0x200 + spec.code64.len()].copy_from_slice(&spec.code64);
    image.extend_from_slice(&payload);
    image
}
