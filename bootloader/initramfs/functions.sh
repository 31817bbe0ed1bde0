# Helpers of the obelisk initramfs /init (busybox sh). Kept apart so tests can source them.

log() { echo "obelisk-initramfs: $*"; }

# The 16 bytes at OFFSET of FILE as lowercase hex, no spaces.
hexat() { od -A n -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

# GUID text of the 16 mixed-endian bytes at OFFSET of FILE.
guidat() {
    h=$(hexat "$1" "$2" 16)
    [ ${#h} -eq 32 ] || return 1
    b() { echo "$h" | cut -c$(( $1 * 2 + 1 ))-$(( $1 * 2 + 2 )); }
    echo "$(b 3)$(b 2)$(b 1)$(b 0)-$(b 5)$(b 4)-$(b 7)$(b 6)-$(b 8)$(b 9)-$(b 10)$(b 11)$(b 12)$(b 13)$(b 14)$(b 15)"
}

# u32 little-endian at OFFSET of FILE.
u32at() { od -A n -t u4 -j "$2" -N 4 "$1" | tr -d ' \n'; }

sector_size() { cat "/sys/block/$1/queue/logical_block_size" 2>/dev/null || echo 512; }

# Partition GUID of /sys/class/block/PART (reads its disk's primary GPT).
part_guid() {
    part=$1
    n=$(sed -n 's/^PARTN=//p' "/sys/class/block/$part/uevent")
    disk=$(basename "$(dirname "$(readlink -f "/sys/class/block/$part")")")
    ss=$(sector_size "$disk")
    ent_lba=$(u32at "/dev/$disk" $(( ss + 72 )))
    ent_size=$(u32at "/dev/$disk" $(( ss + 84 )))
    guidat "/dev/$disk" $(( ent_lba * ss + (n - 1) * ent_size + 16 ))
}

# /dev path for SPEC: PARTUUID=.., PARTLABEL=.., or a /dev path. Empty when not there (yet).
find_dev() {
    spec=$1
    case "$spec" in
    /dev/*) [ -b "$spec" ] && echo "$spec"; return 0 ;;
    PARTLABEL=*)
        want=${spec#PARTLABEL=}
        for u in /sys/class/block/*/uevent; do
            if grep -qx "PARTNAME=$want" "$u"; then
                echo "/dev/$(sed -n 's/^DEVNAME=//p' "$u")"; return 0
            fi
        done ;;
    PARTUUID=*)
        want=$(echo "${spec#PARTUUID=}" | tr 'A-F' 'a-f')
        for u in /sys/class/block/*/uevent; do
            grep -q '^PARTN=' "$u" || continue
            p=$(basename "$(dirname "$u")")
            if [ "$(part_guid "$p")" = "$want" ]; then echo "/dev/$p"; return 0; fi
        done ;;
    esac
    return 0
}

# Wait up to 20 s for SPEC to appear (virtio probing is asynchronous).
wait_dev() {
    i=0
    while [ $i -lt 200 ]; do
        d=$(find_dev "$1")
        if [ -n "$d" ] && [ -b "$d" ]; then echo "$d"; return 0; fi
        usleep 100000; i=$(( i + 1 ))
    done
    return 1
}

# The disk (/dev/vda) a partition device (/dev/vda9) belongs to.
disk_of() { echo "/dev/$(basename "$(dirname "$(readlink -f "/sys/class/block/$(basename "$1")")")")"; }

# --- Boot records (docs/health.md; the format is obelisk/trial_record.py's: key=value lines) --------
# Nothing here may stop a boot: every caller ignores the status, and every text is cut to one line of
# printable bytes (tr with explicit ranges: busybox tr gets [:print:] with -c wrong).

# TEXT as one line of at most MAX (default 300) bytes without control characters.
clean_line() { printf '%s' "$1" | tr '\000-\037\177' ' ' | cut -c "1-${2:-300}"; }

# A record on stdout. Arguments: time slot version source reason [detail].
record_text() {
    printf 'time=%s\nslot=%s\nversion=%s\nsource=%s\nreason=%s\n' "$(clean_line "$1" 12)" "$(clean_line "$2" 8)" \
        "$(clean_line "$3" 64)" "$(clean_line "$4" 16)" "$(clean_line "$5")"
    [ -z "$6" ] || printf 'detail=%s\n' "$(clean_line "$6" 1000)"
}

# Append the record in FILE to STATE/boot-log, keeping the log at about 16 KiB (a record cut at the
# front is skipped by its reader).
log_append() {
    { [ -f "$1/boot-log" ] && tail -c 12288 "$1/boot-log"; printf -- '--\n'; cat "$2"; } > "$1/boot-log.new" \
        && mv -f "$1/boot-log.new" "$1/boot-log"
}

# The record in FILE becomes STATE/trial-failure (what the update daemon reports) and joins boot-log.
store_record() {
    [ -d "$1" ] || { mkdir -p "$1" && chmod 0700 "$1"; } || return 1
    cp "$2" "$1/trial-failure.new" && mv -f "$1/trial-failure.new" "$1/trial-failure"
    log_append "$1" "$2"
    sync
}

# A version as GRUB passes it (obelisk.version=); anything else (an unexpanded $var) is no version.
valid_version() { echo "$1" | grep -Eq '^[A-Za-z0-9.+~_-]{1,64}$' && echo "$1"; }

# Write a record of this boot's failure into DIR/EFI/obelisk/trial-SLOT.txt (DIR: the mounted ESP).
write_esp_record() {
    mkdir -p "$1/EFI/obelisk" || return 1
    record_text "$(date +%s)" "$2" "$3" initramfs "$4" "$5" > "$1/EFI/obelisk/trial-$2.txt" || return 1
    sync
}

# This boot's initramfs cannot go on: leave REASON [DETAIL] on the ESP for the next boot to collect.
# Arguments: slot version reason [detail]. The ESP is found by its label and mounted only for this.
early_record() {
    [ -n "$1" ] || return 0
    espdev=$(find_dev PARTLABEL=EFI-SYSTEM)
    [ -n "$espdev" ] && [ -b "$espdev" ] || return 0
    mkdir -p /run/obelisk/esp-rec
    mount -t vfat -o rw "$espdev" /run/obelisk/esp-rec 2>/dev/null || return 0
    write_esp_record /run/obelisk/esp-rec "$1" "$2" "$3" "$4"
    umount /run/obelisk/esp-rec
}

# The last dm-verity corruption the kernel logged ("data block 123 is corrupted"), if any.
verity_block() {
    dmesg 2>/dev/null | tr '\000-\011\013-\037\177' ' ' | grep -o -E '(data|metadata) block [0-9]+ is corrupted' \
        | tail -n 1
}

# A pstore dump (dmesg-*) as a record; arguments: state dir, this slot. Prints nothing when DIR has none.
# The dump names its slot when the command line is in it; else the last trial boot's note names it.
pstore_record() {
    pdir=$1 state=$2
    set -- "$pdir"/dmesg-*
    [ -e "$1" ] || return 0
    text=${TMPDIR:-/run/obelisk}/.pstore-text
    : > "$text"
    when=0
    for f in "$@"; do
        [ -f "$f" ] || continue
        t=$(stat -c %Y "$f" 2>/dev/null)
        [ -n "$t" ] && [ "$t" -gt "$when" ] 2>/dev/null && when=$t
        case "$f" in
        *.enc.z) echo "(compressed pstore record ${f##*/}: not readable here)" >> "$text" ;;
        *) head -c 65536 "$f" | tr -d '\000-\011\013-\037\177' >> "$text" ;;
        esac
    done
    panic=$(grep -o 'Kernel panic - not syncing: .*' "$text" | tail -n 1)
    block=$(grep -o -E '(data|metadata) block [0-9]+ is corrupted' "$text" | tail -n 1)
    slot=$(grep -o -E 'obelisk\.slot=[AB]' "$text" | tail -n 1 | cut -d= -f2)
    version=
    if [ -f "$state/trial-boot" ]; then
        tslot=$(sed -n 's/^slot=\([AB]\)$/\1/p' "$state/trial-boot" | head -n 1)
        [ -n "$slot" ] || slot=$tslot
        [ "$slot" = "$tslot" ] && version=$(valid_version "$(sed -n 's/^version=//p' "$state/trial-boot" | head -n 1)")
    fi
    if [ -n "$panic" ]; then
        reason="kernel ${panic#Kernel }"
    else
        reason="kernel $(grep -m 1 . "$text" | cut -c 1-120)"
    fi
    [ -z "$block" ] || reason="$reason (dm-verity: $block)"
    detail=$(grep . "$text" | tail -n 6 | tr '\n' '|' | sed 's/|$//; s/|/ | /g')
    [ "$when" -gt 0 ] 2>/dev/null || when=$(date +%s)
    record_text "$when" "$slot" "$version" pstore "$reason" "$detail"
    rm -f "$text"
}

# Take what earlier boots left before userspace into ROOT (STATE = /sysroot/var/lib/obelisk):
# ESP records (ESPDIR/EFI/obelisk/trial-*.txt, deleted once kept), pstore dumps (PSTORE/dmesg-*, deleted
# once kept: the firmware's space is small), and GRUB's mark of a slot it could not load in this very
# boot (LOADFAIL, from obelisk.loadfail=; newest, so stored last). Arguments: espdir pstore state
# this-slot loadfail. Prints one line per record kept.
collect_records() {
    espdir=$1 pdir=$2 state=$3 this=$4 loadfail=$5
    rec=${TMPDIR:-/run/obelisk}/.collect
    for s in A B; do
        f=$espdir/EFI/obelisk/trial-$s.txt
        [ -n "$espdir" ] && [ -f "$f" ] || continue
        head -c 4096 "$f" | tr -d '\000-\011\013-\037\177' > "$rec"
        if grep -q '^reason=.' "$rec"; then
            grep -q '^source=' "$rec" || echo "source=initramfs" >> "$rec"
            store_record "$state" "$rec" && echo "kept the ESP's record of slot $s"
        fi
        rm -f "$f"
    done
    if [ -n "$pdir" ] && [ -d "$pdir" ]; then
        pstore_record "$pdir" "$state" > "$rec"
        if [ -s "$rec" ]; then
            store_record "$state" "$rec" && echo "kept the kernel's pstore record"
            rm -f "$pdir"/dmesg-*
        fi
    fi
    if echo "$loadfail" | grep -Eq '^[AB]:(linux|initrd|boot):[A-Za-z0-9.+~_-]{0,64}$'; then
        ls=${loadfail%%:*} rest=${loadfail#*:}
        step=${rest%%:*} lv=${rest#*:}
        case "$step" in linux) what=kernel ;; initrd) what=initrd ;; *) what="kernel (boot returned)" ;; esac
        record_text "$(date +%s)" "$ls" "$lv" grub \
            "GRUB could not load the $what of slot $ls; it booted slot ${this:-?} instead" > "$rec"
        store_record "$state" "$rec" && echo "kept GRUB's mark: slot $ls did not load ($step)"
    fi
    rm -f "$rec"
}

# On a trial boot that reached this point: note it on ROOT, so a trial that stops later without a record
# is told apart from one that never got here. Arguments: state slot version.
note_trial_boot() {
    mkdir -p "$1" 2>/dev/null || return 0
    printf 'time=%s\nslot=%s\nversion=%s\n' "$(date +%s)" "$2" "$(clean_line "$3" 64)" > "$1/trial-boot.new" \
        && mv -f "$1/trial-boot.new" "$1/trial-boot" && sync
}
