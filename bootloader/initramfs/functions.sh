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
