//! The guest physical address map (x86-64).
//!
//! ```text
//! 0                     RAM (low part, at most 3 GiB)
//!   0x500 .. 0x9fc00      boot data written by `boot` (GDT, page tables, zero page, PVH start
//!                         info, command line, MP table at the top)
//!   0x9fc00 .. 0x100000   reported as reserved in the memory map (EBDA, VGA, BIOS area)
//!   0x100000 ..           kernel, then the initramfs near the end of low RAM
//!   0xe0000 .. 0x100000   ACPI tables (RSDP first, where a guest scanning for it looks)
//! 3 GiB                 32-bit MMIO hole: PCI BARs, the PCI hot-plug controller, then IOAPIC
//!                       and LAPIC
//! 4 GiB                 RAM (high part), when the guest has more than 3 GiB
//! ```

/// Start of the area where boot data (GDT, page tables, boot structures) is written.
pub const BOOT_DATA_START: u64 = 0x500;
/// End of the usable low memory below 1 MiB (start of the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded: 1 MiB, above the legacy BIOS area.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; low RAM ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
/// Where RAM above the MMIO hole starts.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// First address for PCI BARs (inside the MMIO hole).
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the PCI BAR window, below the PCI hot-plug controller.
pub const PCI_MMIO_END: u64 = PCI_HOTPLUG_START;
/// The PCI hot-plug controller's registers (see `devices::pci::hotplug`), which the DSDT's
/// slot methods use.
pub const PCI_HOTPLUG_START: u64 = 0xfeb0_0000;
/// Size of the PCI hot-plug controller's register page.
pub const PCI_HOTPLUG_SIZE: u64 = 0x1000;
/// Where the ACPI tables are written: the RSDP, then XSDT, FADT, MADT and DSDT.
pub const ACPI_TABLES_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI table area (the legacy BIOS area ends at 1 MiB).
pub const ACPI_TABLES_END: u64 = HIGH_MEMORY_START;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Legacy IRQ (IOAPIC pin) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Legacy IRQ (IOAPIC pin, edge-triggered) of the PCI hot-plug controller: the ACPI Generic
/// Event Device's interrupt.
pub const PCI_HOTPLUG_IRQ: u32 = 5;
/// Port base of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Port base of the i8042 controller (0x60..0x64 is covered with one range).
pub const I8042_PORT: u64 = 0x60;
/// Port base of the CMOS RTC (index and data ports).
pub const CMOS_PORT: u64 = 0x70;
/// Port base of PCI configuration mechanism #1 (address and data).
pub const PCI_CONFIG_PORT: u64 = 0xcf8;

/// The guest RAM ranges for `size` bytes of RAM: `(guest address, length)` pairs, in order.
/// Each range is backed by the same memfd, one after the other.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((HIGH_RAM_START, size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_hole() {
        let ranges = ram_ranges(16 << 30);

        assert_eq!(
            ranges,
            vec![
                (0, MMIO_HOLE_START),
                (HIGH_RAM_START, (16 << 30) - MMIO_HOLE_START)
            ]
        );
    }
}
