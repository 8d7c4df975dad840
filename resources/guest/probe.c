/*
 * probe: a tiny freestanding PVH test guest.
 *
 * Modes (from the PVH command line, whitespace-separated key=value words):
 *   mode=probe (default)  dump bus 0 config space via CF8/CFC and via ECAM
 *                         in `lspci -xxxx` format (decode with `lspci -F`)
 *   mode=bench op=cf8|ecam|null n=N [port=0x..]
 *   mode=hello
 *   mode=hostile seed=N n=N [spare=SS]
 *                         N random hostile config/MMIO operations on every
 *                         function but 00:00.0 and slot SS, then mode=probe
 *   mode=hotplug seed=N n=N [wait=N] [hpbuses=N]
 *                         N random accesses to the ACPI PCI hot-plug registers
 *                         (0xae00) and the GED (0xaf00), checks, optionally
 *                         waits for an eject request and ejects it, then
 *                         mode=probe
 *   mode=lifecycle        every virtio function: driver bring-up, kick,
 *                         reset, bring-up again, reset again
 *   mode=enum [op=ecam|cf8] [ring=3] [hold=N]
 *                         a timed full enumeration without output: every
 *                         function's 256 bytes read, bridges numbered depth
 *                         first as firmware does; then N null exits (hold)
 *   mode=extcfg           every function (through bridges): ECAM reads of
 *                         the extended config space (0x100-0xfff) at every
 *                         width, writes there, reads again
 *   ecam=0x...            ECAM base (default 0xE0000000; 0 skips ECAM)
 *
 * Built -m32 -ffreestanding -mgeneral-regs-only: no SSE, no int3, no libgcc.
 * Every instruction at CPL0 is emulated on this machine's KVM (~1M insn/s),
 * so the code below is kept simple and lean.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define COM1 0x3f8

extern void probe_stop(void) __attribute__((noreturn));
extern void enter_user(void (*fn)(void *), void *arg, void *stack_top)
	__attribute__((noreturn));
extern char user_stack_top[];

static inline void outb(u16 port, u8 v)
{
	asm volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(u16 port, u32 v)
{
	asm volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u32 inl(u16 port)
{
	u32 v;
	asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u16 inw(u16 port)
{
	u16 v;
	asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outw(u16 port, u16 v)
{
	asm volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void mmio_write32(u32 addr, u32 v)
{
	asm volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

static inline void mmio_write16(u32 addr, u16 v)
{
	asm volatile("movw %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

static inline void mmio_write8(u32 addr, u8 v)
{
	asm volatile("movb %0, (%1)" : : "q"(v), "r"(addr) : "memory");
}

static inline u32 mmio_read32(u32 addr)
{
	u32 v;
	asm volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline u16 mmio_read16(u32 addr)
{
	u16 v;
	asm volatile("movw (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline u8 mmio_read8(u32 addr)
{
	u8 v;
	asm volatile("movb (%1), %0" : "=q"(v) : "r"(addr) : "memory");
	return v;
}

/* ---- serial output (8250 THR, no LSR polling: QEMU and our VMM never
 * report a full transmitter, and every poll would be another exit) ---- */

static void putc(char c)
{
	outb(COM1, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static const char hexdig[] = "0123456789abcdef";

static void puthex(u32 v, int digits)
{
	while (digits--)
		putc(hexdig[(v >> (digits * 4)) & 0xf]);
}

static void putdec(u32 v)
{
	char buf[11];
	int i = 0;
	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		putc(buf[--i]);
}

/* ---- command line ---- */

struct opts {
	const char *mode;	/* points into the cmdline, terminated by space/NUL */
	const char *op;
	u32 n;
	u32 ecam;
	u32 port;
	u32 ring;
	u32 seed;	/* hostile: PRNG seed */
	u32 spare;	/* hostile: slot not to touch (0xff: none) */
	u32 steal;	/* hostile: aim a notify area at the spare's command register */
	u32 wait;	/* hotplug: polls of PCID while waiting for an eject request */
	u32 hold;	/* enum: null exits after the enumeration (the host samples memory) */
	u32 decode;	/* enum: then enable memory decoding of every endpoint */
	u32 msix;	/* enum: then program and unmask every MSI-X vector */
	u32 hpbuses;	/* hotplug: buses 1..hpbuses are bridges' buses with hot-plug */
};

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Does word w (terminated by space/NUL) equal s? */
static int word_eq(const char *w, const char *s)
{
	if (!w)
		return 0;
	while (*s && *w == *s)
		w++, s++;
	return !*s && (!*w || is_space(*w));
}

static u32 parse_num(const char *s)
{
	u32 v = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			char c = *s;
			if (c >= '0' && c <= '9')
				v = (v << 4) | (u32)(c - '0');
			else if (c >= 'a' && c <= 'f')
				v = (v << 4) | (u32)(c - 'a' + 10);
			else if (c >= 'A' && c <= 'F')
				v = (v << 4) | (u32)(c - 'A' + 10);
			else
				break;
		}
	} else {
		for (; *s >= '0' && *s <= '9'; s++)
			v = v * 10 + (u32)(*s - '0');
	}
	return v;
}

/* Hex without a prefix (a PCI slot, as in addr=): "1f" -> 31. */
static u32 parse_hex(const char *s)
{
	u32 v = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		s += 2;
	for (;; s++) {
		char c = *s;

		if (c >= '0' && c <= '9')
			v = (v << 4) | (u32)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v = (v << 4) | (u32)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v = (v << 4) | (u32)(c - 'A' + 10);
		else
			return v;
	}
}

/* If word w starts with "key=", return the value, else 0. */
static const char *match_key(const char *w, const char *key)
{
	while (*key && *w == *key)
		w++, key++;
	if (*key || *w != '=')
		return 0;
	return w + 1;
}

static void parse_cmdline(const char *p, struct opts *o)
{
	o->mode = 0;
	o->op = 0;
	o->n = 0;
	o->ecam = 0xE0000000u;
	o->port = 0x2f0;
	o->ring = 0;
	o->seed = 1;
	o->spare = 0xff;
	o->steal = 0;
	o->wait = 0;
	o->hold = 0;
	o->decode = 0;
	o->msix = 0;
	o->hpbuses = 0;
	if (!p)
		return;
	for (;;) {
		const char *v;
		while (is_space(*p))
			p++;
		if (!*p)
			return;
		if ((v = match_key(p, "mode")))
			o->mode = v;
		else if ((v = match_key(p, "op")))
			o->op = v;
		else if ((v = match_key(p, "n")))
			o->n = parse_num(v);
		else if ((v = match_key(p, "ecam")))
			o->ecam = parse_num(v);
		else if ((v = match_key(p, "ring")))
			o->ring = parse_num(v);
		else if ((v = match_key(p, "seed")))
			o->seed = parse_num(v);
		else if ((v = match_key(p, "msix")))
			o->msix = parse_num(v);
		else if ((v = match_key(p, "decode")))
			o->decode = parse_num(v);
		else if ((v = match_key(p, "hold")))
			o->hold = parse_num(v);
		else if ((v = match_key(p, "wait")))
			o->wait = parse_num(v);
		else if ((v = match_key(p, "hpbuses")))
			o->hpbuses = parse_num(v);
		else if ((v = match_key(p, "steal")))
			o->steal = parse_num(v);
		else if ((v = match_key(p, "spare")))
			o->spare = parse_hex(v);
		else if ((v = match_key(p, "port")))
			o->port = parse_num(v) & 0xffff;
		while (*p && !is_space(*p))
			p++;
	}
}

static void put_word(const char *w)
{
	while (w && *w && !is_space(*w))
		putc(*w++);
}

/* ---- PCI config access ---- */

static u32 cf8_read(u32 bdf, u32 off)
{
	outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
	return inl(0xcfc);
}

static u32 ecam_base;

static u32 ecam_read(u32 bdf, u32 off)
{
	return mmio_read32(ecam_base + (bdf << 12) + (off & 0xffc));
}

typedef u32 (*cfg_read_fn)(u32 bdf, u32 off);

static int present(u32 id)
{
	u16 vendor = (u16)id;
	return vendor != 0xffff && vendor != 0x0000;
}

/*
 * Calls visit(rd, bdf, id, ctx) for every present function of `bus`, in the
 * order Linux scans: function 0 of each slot first, functions 1..7 only if
 * function 0 is multifunction. Following bridges is the visitor's business.
 */
typedef void (*visit_fn)(cfg_read_fn rd, u32 bdf, u32 id, void *ctx);

static void each_function(cfg_read_fn rd, u32 bus, visit_fn visit, void *ctx)
{
	u32 dev, fn;

	for (dev = 0; dev < 32; dev++) {
		u32 base = (bus << 8) | (dev << 3);
		u32 id = rd(base, 0);
		u32 multi;

		if (!present(id))
			continue;
		multi = (rd(base, 0x0c) >> 16) & 0x80;
		for (fn = 0; fn < 8; fn++) {
			if (fn) {
				if (!multi)
					break;
				id = rd(base | fn, 0);
				if (!present(id))
					continue;
			}
			visit(rd, base | fn, id, ctx);
		}
	}
}

/*
 * One function in `lspci -xxxx` layout:
 *   "BB:DD.F VVVV:DDDD\n" then "xx: b0 b1 ... b15\n" (offset printed "%02x",
 *   i.e. 00..f0 then 100..ff0) and a blank line.
 */
static void dump_function(cfg_read_fn rd, u32 bdf, u32 id, u32 size)
{
	u32 off;

	puthex(bdf >> 8, 2);
	putc(':');
	puthex((bdf >> 3) & 0x1f, 2);
	putc('.');
	puthex(bdf & 7, 1);
	putc(' ');
	puthex(id & 0xffff, 4);
	putc(':');
	puthex(id >> 16, 4);
	putc('\n');

	for (off = 0; off < size; off += 4) {
		u32 v = off ? rd(bdf, off) : id;
		if (!(off & 15)) {
			puthex(off, off < 0x100 ? 2 : 3);
			putc(':');
		}
		putc(' '); puthex(v & 0xff, 2);
		putc(' '); puthex((v >> 8) & 0xff, 2);
		putc(' '); puthex((v >> 16) & 0xff, 2);
		putc(' '); puthex(v >> 24, 2);
		if ((off & 15) == 12)
			putc('\n');
	}
	putc('\n');
}

/*
 * Scan a bus like Linux: function 0 first, 1..7 only if multifunction. A
 * bridge (header type 1) is followed by the bus behind it (its programmed
 * secondary bus number, which must be above the bus it sits on; at most 8
 * levels), so bus 0's dump is what it always was when there are no bridges.
 */
struct scan {
	u32 bus, size, depth;
};

static void scan_bus(cfg_read_fn rd, u32 bus, u32 size, u32 depth);

static void scan_visit(cfg_read_fn rd, u32 bdf, u32 id, void *ctx)
{
	const struct scan *c = ctx;
	u32 sec;

	dump_function(rd, bdf, id, c->size);
	if (((rd(bdf, 0x0c) >> 16) & 0x7f) != 1)
		return;
	sec = (rd(bdf, 0x18) >> 8) & 0xff;
	if (sec > c->bus && c->depth < 8)
		scan_bus(rd, sec, c->size, c->depth + 1);
}

static void scan_bus(cfg_read_fn rd, u32 bus, u32 size, u32 depth)
{
	struct scan c = { bus, size, depth };

	each_function(rd, bus, scan_visit, &c);
}

/* ---- modes ---- */

static void mode_probe(const struct opts *o)
{
	puts("=== PROBE-CF8-BEGIN ===\n");
	scan_bus(cf8_read, 0, 256, 0);
	puts("=== PROBE-CF8-END ===\n");
	if (o->ecam) {
		ecam_base = o->ecam;
		puts("probe: ecam base=0x");
		puthex(o->ecam, 8);
		puts("\n=== PROBE-ECAM-BEGIN ===\n");
		scan_bus(ecam_read, 0, 4096, 0);
		puts("=== PROBE-ECAM-END ===\n");
	}
}

/*
 * ---- mode=hostile seed=N n=N [spare=SS] ----
 * n random operations against every present function except the host bridge
 * (00:00.0) and slot `spare`: BARs moved over each other, over RAM, over the
 * ECAM window, sized; command-register toggles; capability-pointer and
 * capability-area writes; MSI-X control and table writes; MMIO reads and
 * writes in the BARs. Config writes go through CF8/CFC and ECAM at random.
 * MMIO writes only go to BARs that lie inside the PCI window below ECAM (a
 * BAR over RAM is shadowed by RAM: writing there would hit this guest's own
 * memory). Then the usual probe dump.
 */
#define HOSTILE_MAX 64
#define PCI_WINDOW 0xc0000000u

static u32 rnd_state;

static u32 rnd(void)
{
	u32 x = rnd_state;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	rnd_state = x;
	return x;
}

static void cf8_write(u32 bdf, u32 off, u32 v)
{
	outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
	outl(0xcfc, v);
}

static void cfg_write(u32 bdf, u32 off, u32 v)
{
	if (rnd() & 1)
		cf8_write(bdf, off, v);
	else
		mmio_write32(ecam_base + (bdf << 12) + (off & 0xffc), v);
}

/* A 16-bit config write at an even offset through CF8/CFC. */
static void cf8_write16(u32 bdf, u32 off, u16 v)
{
	outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
	outw((u16)(0xcfc + (off & 2)), v);
}

/* Offset of capability `id` of `bdf`, or 0. */
static u32 find_cap(u32 bdf, u32 id)
{
	u32 ptr = cf8_read(bdf, 0x34) & 0xfc;
	u32 guard = 0;

	while (ptr && guard++ < 48) {
		u32 v = cf8_read(bdf, ptr);

		if ((v & 0xff) == id)
			return ptr;
		ptr = (v >> 8) & 0xfc;
	}
	return 0;
}

/* Where memory BAR `bar` of `bdf` is, if MMIO writes there are safe; else 0. */
static u32 bar_base(u32 bdf, u32 bar)
{
	u32 v = cf8_read(bdf, 0x10 + 4 * bar);

	if (v & 1)
		return 0;	/* I/O */
	if ((v & 6) == 4 && bar < 5 && cf8_read(bdf, 0x14 + 4 * bar))
		return 0;	/* 64-bit, above 4 GiB */
	v &= ~0xfu;
	if (v < PCI_WINDOW || v >= ecam_base - 0x1000u)
		return 0;
	return v;
}

static u32 hostile_value(const u32 *fns, u32 nfns)
{
	switch (rnd() % 9) {
	case 0:
		return 0xffffffffu;			/* sizing */
	case 1:
		return ecam_base + (rnd() & 0xf000);	/* over ECAM */
	case 2:
		return 0x00100000u + (rnd() & 0xf000);	/* over RAM (this guest) */
	case 3:
		return PCI_WINDOW + (rnd() & 0x3f) * 0x1000u;
	case 4:
		/* over another function's BAR */
		return cf8_read(fns[rnd() % nfns], 0x10 + 4 * (rnd() % 6));
	case 5:
		return 0;
	case 6:
		return 0xfee00000u;			/* the MSI window */
	case 7:
		return PCI_WINDOW + 0x100000u * (rnd() & 7);
	default:
		return rnd();
	}
}


static void put_bdf(u32 bdf)
{
	puthex(bdf >> 8, 2);
	putc(':');
	puthex((bdf >> 3) & 0x1f, 2);
	putc('.');
	puthex(bdf & 7, 1);
}

/*
 * steal=1: move BAR 4 of a two-queue virtio function (virtio-console,
 * 1af4:1043) so that its queue-1 notify address (BAR4 + 0x3000 + 4) is the
 * ECAM address of the command register of the spare slot's function with
 * (bdf & 3) == 3 (BAR 4 is 16 KiB aligned), memory decoding on. A VMM that
 * registers notify ioeventfds for a BAR it did not map lets KVM swallow
 * the spare's ECAM command-register writes.
 */
static void hostile_steal(const struct opts *o, const u32 *fns, u32 nfns)
{
	u32 i, fn, victim = 0, thief = 0;

	for (fn = 0; fn < 8; fn++) {
		u32 bdf = (o->spare << 3) | fn;

		if ((bdf & 3) == 3 && present(cf8_read(bdf, 0)))
			victim = bdf;
	}
	for (i = 0; i < nfns; i++)
		if (cf8_read(fns[i], 0) == 0x10431af4u)
			thief = fns[i];
	if (!victim || !thief) {
		puts("hostile: steal: no victim or no two-queue function\n");
		return;
	}
	cf8_write(thief, 0x20, ecam_base + (victim << 12) + 4 - 0x3004);
	cf8_write(thief, 0x24, 0);
	cf8_write16(thief, 0x04, (u16)(cf8_read(thief, 0x04) | 2));
	puts("hostile: steal ");
	put_bdf(victim);
	puts(" command via ");
	put_bdf(thief);
	putc('\n');
}

/*
 * The spare slot must still take config writes, through both mechanisms:
 * interrupt line (0x3c) and the bus-master bit of the command register,
 * written one way, read back the other, then restored.
 */
static void hostile_check_spare(const struct opts *o)
{
	u32 fn;

	for (fn = 0; fn < 8; fn++) {
		u32 bdf = (o->spare << 3) | fn;
		u32 ecam = ecam_base + (bdf << 12);
		u32 cmd, line, bad = 0;

		if (!present(cf8_read(bdf, 0)))
			continue;
		line = cf8_read(bdf, 0x3c) & 0xff;
		cmd = cf8_read(bdf, 0x04) & 0xffff;
		mmio_write8(ecam + 0x3c, (u8)(line ^ 0x5a));
		if ((cf8_read(bdf, 0x3c) & 0xff) != (line ^ 0x5a))
			bad |= 1;
		cf8_write16(bdf, 0x3c, (u16)((cf8_read(bdf, 0x3c) & 0xff00) | line));
		mmio_write16(ecam + 0x04, (u16)(cmd ^ 4));
		if ((cf8_read(bdf, 0x04) & 0xffff) != (cmd ^ 4))
			bad |= 2;
		cf8_write16(bdf, 0x04, (u16)cmd);
		if ((mmio_read32(ecam + 0x04) & 0xffff) != cmd)
			bad |= 4;
		puts("hostile: spare ");
		put_bdf(bdf);
		if (!bad) {
			puts(" writes ok\n");
			continue;
		}
		if (bad & 1)
			puts(" interrupt-line ECAM write LOST");
		if (bad & 2)
			puts(" command ECAM write LOST");
		if (bad & 4)
			puts(" command CF8 write LOST");
		putc('\n');
	}
}

/*
 * A driver bringing up queue 0 or 1 of a virtio function whose BAR 4 lies in
 * the PCI window, with rings and buffers (random descriptors, lengths, flags
 * NEXT/WRITE, chain links, avail entries) all inside a scratch area of RAM,
 * away from this guest's image, then a notify (a KVM ioeventfd when the VMM
 * registered one). The device worker then serves hostile chains for real.
 */
#define SCRATCH 0x00800000u

static void hostile_virtio(u32 bdf)
{
	u32 base = bar_base(bdf, 4), q, i, n;

	if ((cf8_read(bdf, 0) & 0xffff) != 0x1af4)
		return;
	if (!base) {
		/* Place BAR 4 in the PCI window like a firmware would. */
		base = PCI_WINDOW + 0x01000000u + (bdf << 16);
		cf8_write(bdf, 0x20, base);
		cf8_write(bdf, 0x24, 0);
	}
	cf8_write16(bdf, 0x04, (u16)(cf8_read(bdf, 0x04) | 6));
	q = rnd() & 1;
	mmio_write8(base + 0x14, 0);
	mmio_write8(base + 0x14, 1);
	mmio_write8(base + 0x14, 3);
	mmio_write32(base + 0x08, 1);
	mmio_write32(base + 0x0c, 1);		/* VIRTIO_F_VERSION_1 */
	mmio_write32(base + 0x08, 0);
	mmio_write32(base + 0x0c, rnd());
	mmio_write8(base + 0x14, 0xb);
	mmio_write16(base + 0x16, (u16)q);
	mmio_write16(base + 0x18, 8);
	mmio_write16(base + 0x1a, (u16)((rnd() & 3) == 3 ? 0xffff : rnd() % 3));
	mmio_write32(base + 0x20, SCRATCH);
	mmio_write32(base + 0x24, 0);
	mmio_write32(base + 0x28, SCRATCH + 0x1000);
	mmio_write32(base + 0x2c, 0);
	mmio_write32(base + 0x30, SCRATCH + 0x2000);
	mmio_write32(base + 0x34, 0);
	for (i = 0; i < 8; i++) {
		u32 d = SCRATCH + 16 * i;

		*(volatile u32 *)d = SCRATCH + 0x4000 + (rnd() & 0x3ff0);
		*(volatile u32 *)(d + 4) = 0;
		*(volatile u32 *)(d + 8) = rnd() & 0x3ff;
		*(volatile u32 *)(d + 12) = (rnd() & 3) | ((rnd() & 7) << 16);
	}
	/* A request header at the first buffer of each chain (virtio-blk). */
	for (i = 0; i < 64; i++)
		*(volatile u32 *)(SCRATCH + 0x4000 + 4 * (rnd() & 0xfff)) = rnd() % 9;
	n = rnd() % 9;
	for (i = 0; i < 8; i++)
		*(volatile u16 *)(SCRATCH + 0x1004 + 2 * i) = (u16)(rnd() & 7);
	*(volatile u16 *)(SCRATCH + 0x1000) = 0;
	*(volatile u16 *)(SCRATCH + 0x1002) = (u16)n;
	mmio_write16(base + 0x1c, 1);
	mmio_write8(base + 0x14, 0xf);
	mmio_write16(base + 0x3000 + 4 * q, (u16)q);
}

static void mode_hostile(const struct opts *o)
{
	u32 fns[HOSTILE_MAX];
	u32 nfns = 0, dev, fn, i;

	ecam_base = o->ecam ? o->ecam : 0xE0000000u;
	rnd_state = o->seed ? o->seed : 1;
	puts("=== HOSTILE seed=");
	putdec(o->seed);
	puts(" n=");
	putdec(o->n);
	puts(" start ===\n");
	for (dev = 1; dev < 32; dev++) {
		u32 id = cf8_read(dev << 3, 0);

		if (!present(id) || dev == o->spare)
			continue;
		for (fn = 0; fn < 8 && nfns < HOSTILE_MAX; fn++) {
			u32 bdf = (dev << 3) | fn;

			if (present(cf8_read(bdf, 0)))
				fns[nfns++] = bdf;
		}
	}
	puts("hostile: ");
	putdec(nfns);
	puts(" functions\n");
	for (i = 0; nfns && i < o->n; i++) {
		u32 bdf = fns[rnd() % nfns];
		u32 r = rnd();
		u32 cap, base, bar;

		switch (r % 11) {
		case 0:
		case 1:	/* move or size a BAR */
			cfg_write(bdf, 0x10 + 4 * ((r >> 8) % 6), hostile_value(fns, nfns));
			break;
		case 2:	/* command register: decode, bus master, INTx off */
			cf8_write16(bdf, 0x04, (u16)(rnd() & 0x407));
			break;
		case 3:	/* read-only and capability registers */
			if (r & 0x100)
				cfg_write(bdf, 0x34, rnd());
			else
				cfg_write(bdf, 0x40 + (rnd() % 0xc0), rnd());
			break;
		case 4:	/* MSI-X message control: enable / function mask */
			cap = find_cap(bdf, 0x11);
			if (cap)
				cf8_write16(bdf, cap + 2, (u16)(rnd() & 0xc000));
			break;
		case 5:	/* MSI-X table entry */
			cap = find_cap(bdf, 0x11);
			if (!cap)
				break;
			bar = cf8_read(bdf, cap + 4);
			base = bar_base(bdf, bar & 7);
			if (base)
				mmio_write32(base + (bar & ~7u) + (rnd() & 0x7c), hostile_value(fns, nfns));
			break;
		case 6:	/* ROM BAR, expansion and interrupt line */
			cfg_write(bdf, (r & 0x100) ? 0x30 : 0x3c, hostile_value(fns, nfns));
			break;
		case 7:	/* MMIO read in a BAR (wherever it is: reads are harmless) */
			base = cf8_read(bdf, 0x10 + 4 * ((r >> 8) % 6)) & ~0xfu;
			if (base >= PCI_WINDOW)
				(void)mmio_read32(base + (rnd() & 0x3ffc));
			break;
		case 8:	/* MMIO write in a BAR inside the PCI window */
			base = bar_base(bdf, (r >> 8) % 6);
			if (base) {
				if (r & 0x10000)
					mmio_write32(base + (rnd() & 0x3ffc), hostile_value(fns, nfns));
				else
					mmio_write8(base + (rnd() & 0x3fff), (u8)rnd());
			}
			break;
		case 9:	/* a driver with hostile rings in scratch RAM */
			if ((r >> 8) % 4 == 0)
				hostile_virtio(bdf);
			break;
		default: /* config reads anywhere, odd latches */
			outl(0xcf8, rnd());
			(void)inb((u16)(0xcfc + (r & 3)));
			outl(0xcf8, 0);
			(void)mmio_read32(ecam_base + (rnd() & 0xffffc));
			break;
		}
	}
	if (o->steal && o->spare != 0xff && nfns)
		hostile_steal(o, fns, nfns);
	if (o->spare != 0xff)
		hostile_check_spare(o);
	puts("=== HOSTILE done ===\n");
	mode_probe(o);
}

/*
 * ---- mode=hotplug seed=N n=N [wait=N] ----
 * N random operations on the hot-plug register block (PCIU 0x0, PCID 0x4,
 * B0EJ 0x8, PCI_RMV 0xc, BNUM 0x10 at port 0xae00) and the GED event register
 * (0xaf00): every width at every offset (inside, around and across the
 * blocks), random values, bus selectors other than 0, ejects of empty slots,
 * of the host bridge's slot and of occupied slots nobody asked to remove,
 * floods of GED reads. Nobody asked for a removal, so between operations:
 * PCID reads 0, PCIU reads 0 (nothing was hot-added), PCI_RMV reads
 * 0xfffffffe on bus 0, 0xffffffff on the bridges' buses 1..hpbuses (hot-plug
 * behind bridges) and 0 on any other selector (buses that do not exist,
 * values above 255), the GED has no event. Selectors: random 32-bit values,
 * small bus numbers around the bridges' and values that alias them modulo
 * 256.
 * Each disagreement is counted and the first few printed ("hotplug: BAD").
 * With wait=N it then polls PCID up to N times for an eject request and
 * ejects what is requested (one B0EJ write per slot, as _EJ0 does). Then the
 * usual probe dump.
 */
#define HP_PORT 0xae00
#define HP_PCIU 0x0
#define HP_PCID 0x4
#define HP_B0EJ 0x8
#define HP_RMV 0xc
#define HP_BNUM 0x10
#define GED_PORT 0xaf00

static u32 hp_bad;
static u32 hp_buses;	/* buses 1..hp_buses have hot-plug registers */

static void hp_check(const char *what, u32 got, u32 want)
{
	if (got == want)
		return;
	if (hp_bad++ < 8) {
		puts("hotplug: BAD ");
		puts(what);
		puts(" read 0x");
		puthex(got, 8);
		puts(" expected 0x");
		puthex(want, 8);
		putc('\n');
	}
}

/* A read or write of width 1, 2 or 4 at `port`, value random. */
static void hp_any_access(u16 port, u32 r)
{
	u32 v = rnd();

	switch ((r >> 4) % 6) {
	case 0: (void)inb(port); break;
	case 1: (void)inw(port); break;
	case 2: (void)inl(port); break;
	case 3: outb(port, (u8)v); break;
	case 4: outw(port, (u16)v); break;
	default: outl(port, v); break;
	}
}

/* A bitmap for B0EJ: random, all ones, one slot, the host bridge, bit 31. */
static u32 hp_bitmap(u32 r)
{
	switch ((r >> 8) % 6) {
	case 0: return 0xffffffffu;
	case 1: return 1u;
	case 2: return 1u << (rnd() & 31);
	case 3: return 0x80000000u;
	case 4: return 0;
	default: return rnd();
	}
}

/* Bus 0 selected: the registers must say "nothing happened". */
static void hp_check_quiet(void)
{
	outl(HP_PORT + HP_BNUM, 0);
	hp_check("BNUM", inl(HP_PORT + HP_BNUM), 0);
	hp_check("PCIU", inl(HP_PORT + HP_PCIU), 0);
	hp_check("PCID", inl(HP_PORT + HP_PCID), 0);
	hp_check("PCI_RMV", inl(HP_PORT + HP_RMV), 0xfffffffeu);
	hp_check("B0EJ", inl(HP_PORT + HP_B0EJ), 0);
	hp_check("GED", inl(GED_PORT), 0);
}

static void hotplug_wait_eject(u32 polls)
{
	u32 i, down = 0, slot;

	puts("hotplug: waiting for an eject request\n");
	outl(HP_PORT + HP_BNUM, 0);
	for (i = 0; i < polls; i++) {
		down = inl(HP_PORT + HP_PCID);
		if (down)
			break;
	}
	if (!down) {
		puts("hotplug: no eject request\n");
		return;
	}
	puts("hotplug: eject request 0x");
	puthex(down, 8);
	puts(" ged 0x");
	puthex(inl(GED_PORT), 8);
	putc('\n');
	for (slot = 1; slot < 32; slot++) {
		if (!(down & (1u << slot)))
			continue;
		outl(HP_PORT + HP_B0EJ, 1u << slot);
		puts("hotplug: ejected slot ");
		puthex(slot, 2);
		putc('\n');
	}
	puts("hotplug: after eject PCID 0x");
	puthex(inl(HP_PORT + HP_PCID), 8);
	putc('\n');
}

static void mode_hotplug(const struct opts *o)
{
	u32 i, k;

	rnd_state = o->seed ? o->seed : 1;
	hp_bad = 0;
	hp_buses = o->hpbuses;
	puts("=== HOTPLUG seed=");
	putdec(o->seed);
	puts(" n=");
	putdec(o->n);
	puts(" start ===\n");
	hp_check_quiet();
	for (i = 0; i < o->n; i++) {
		u32 r = rnd();

		switch (r % 9) {
		case 0:	/* any width, any offset in and around the block */
			hp_any_access((u16)(HP_PORT - 4 + (rnd() % 0x20)), r);
			break;
		case 1: {	/* another bus: nothing pending, ejects nothing */
			u32 sel;

			switch ((r >> 8) % 4) {
			case 0: sel = rnd() | 1; break;		/* anything */
			case 1: sel = 1 + rnd() % (hp_buses + 2); break; /* the bridges' and past them */
			case 2: sel = (1 + rnd() % 4) + (256u << (rnd() % 16)); break; /* aliases */
			default: sel = 255 - rnd() % 4; break;
			}
			outl(HP_PORT + HP_BNUM, sel);
			hp_check("BNUM (bus != 0)", inl(HP_PORT + HP_BNUM), sel);
			hp_check("PCI_RMV (bus != 0)", inl(HP_PORT + HP_RMV),
				 sel >= 1 && sel <= hp_buses ? 0xffffffffu : 0);
			hp_check("PCID (bus != 0)", inl(HP_PORT + HP_PCID), 0);
			hp_check("PCIU (bus != 0)", inl(HP_PORT + HP_PCIU), 0);
			outl(HP_PORT + HP_B0EJ, hp_bitmap(r));
			hp_check("PCID after eject (bus != 0)", inl(HP_PORT + HP_PCID), 0);
			outl(HP_PORT + HP_BNUM, 0);
			break;
		}
		case 2:	/* bus 0: eject slots nobody asked to remove */
			outl(HP_PORT + HP_BNUM, 0);
			outl(HP_PORT + HP_B0EJ, hp_bitmap(r));
			break;
		case 3:	/* partial-width ejects and selector writes */
			if (r & 0x100)
				outw(HP_PORT + HP_B0EJ + ((r >> 9) & 2), (u16)rnd());
			else
				outb(HP_PORT + HP_B0EJ + ((r >> 9) & 3), (u8)rnd());
			outb(HP_PORT + HP_BNUM + ((r >> 12) & 3), (u8)rnd());
			break;
		case 4:	/* flood of GED reads, any width and offset */
			for (k = (r >> 8) % 64; k; k--) {
				u32 w = rnd();

				if (w & 1)
					(void)inl(GED_PORT + ((w >> 1) & 7));
				else if (w & 2)
					(void)inw(GED_PORT + ((w >> 2) & 7));
				else
					(void)inb(GED_PORT + ((w >> 2) & 7));
			}
			break;
		case 5:	/* GED writes */
			hp_any_access((u16)(GED_PORT + (rnd() % 8)), r | 0x30);
			break;
		case 6:	/* writes to the read-only registers */
			outl(HP_PORT + (((r >> 8) % 4) << 2), rnd());
			break;
		case 7:	/* accesses that straddle the ends of the blocks */
			(void)inl(HP_PORT + 0x12);
			outl(HP_PORT + 0x13, rnd());
			(void)inl(HP_PORT - 2);
			outw(HP_PORT - 1, (u16)rnd());
			(void)inl(GED_PORT + 2);
			outl(GED_PORT + 3, rnd());
			break;
		default: /* bus 0 must still say "nothing happened" */
			hp_check_quiet();
			break;
		}
	}
	outl(HP_PORT + HP_BNUM, 0);
	hp_check_quiet();
	puts("hotplug: final PCIU 0x");
	puthex(inl(HP_PORT + HP_PCIU), 8);
	puts(" PCID 0x");
	puthex(inl(HP_PORT + HP_PCID), 8);
	puts(" PCI_RMV 0x");
	puthex(inl(HP_PORT + HP_RMV), 8);
	puts(" BNUM 0x");
	puthex(inl(HP_PORT + HP_BNUM), 8);
	puts(" GED 0x");
	puthex(inl(GED_PORT), 8);
	putc('\n');
	puts("hotplug: anomalies ");
	putdec(hp_bad);
	putc('\n');
	if (o->wait)
		hotplug_wait_eject(o->wait);
	puts("=== HOTPLUG done ===\n");
	mode_probe(o);
}

/*
 * ---- mode=lifecycle ----
 * For every virtio function (vendor 1af4) on bus 0: a minimal driver
 * bring-up (reset and wait for status 0, ACKNOWLEDGE|DRIVER, VERSION_1,
 * FEATURES_OK, queue 0 of size 8 in a ring of its own, enable, DRIVER_OK, one
 * buffer made available and queue 0 kicked), then a reset (status 0, polled
 * until it reads 0), the same bring-up again and a reset again. Even-numbered
 * functions with MSI-X get it enabled (vectors 0 and 1 unmasked, queue 0 on
 * vector 1); the others use INTx. Interrupts stay disabled in the CPU: the
 * point is the VMM's side. The buffer: virtio-blk gets a GET_ID request (it
 * must complete, status 0), virtio-rng a 16-byte writable buffer (it must
 * complete); console and net receive queues just hold a writable buffer.
 */
#define LC_RINGS 0x00c00000u
#define LC_POLLS 200000u

static u32 lc_bar4(u32 bdf)
{
	u32 base = bar_base(bdf, 4);

	if (!base) {
		base = PCI_WINDOW + 0x01000000u + (bdf << 16);
		cf8_write(bdf, 0x20, base);
		cf8_write(bdf, 0x24, 0);
	}
	cf8_write16(bdf, 0x04, (u16)((cf8_read(bdf, 0x04) & 0xffff) | 6));
	return base;
}

/* Status 0, then poll until the device reads 0: 1 if it did. */
static int lc_reset(u32 base)
{
	u32 i;

	mmio_write8(base + 0x14, 0);
	for (i = 0; i < LC_POLLS; i++)
		if (mmio_read8(base + 0x14) == 0)
			return 1;
	return 0;
}

/* MSI-X on with vectors 0 and 1 unmasked (1 if done). */
static int lc_msix(u32 bdf)
{
	u32 cap = find_cap(bdf, 0x11), tbl, base, v;

	if (!cap)
		return 0;
	tbl = cf8_read(bdf, cap + 4);
	base = bar_base(bdf, tbl & 7);
	if (!base) {
		base = PCI_WINDOW + 0x01008000u + (bdf << 16);
		cf8_write(bdf, 0x10 + 4 * (tbl & 7), base);
	}
	base += tbl & ~7u;
	for (v = 0; v < 2; v++) {
		mmio_write32(base + 16 * v, 0xfee00000u);
		mmio_write32(base + 16 * v + 4, 0);
		mmio_write32(base + 16 * v + 8, 0x40 + v);
		mmio_write32(base + 16 * v + 12, 0);	/* unmasked */
	}
	cf8_write16(bdf, cap + 2, 0x8000);
	return 1;
}

/* One bring-up of queue 0; returns 0 or a failure text. */
static const char *lc_up(u32 bdf, u32 base, u32 ring, u32 msix, u32 wait)
{
	u32 i, dev = cf8_read(bdf, 0) >> 16;
	volatile u16 *used_idx = (volatile u16 *)(ring + 0x2002);

	if (!lc_reset(base))
		return "status never read 0 after reset";
	for (i = 0; i < 0x4000; i += 4)
		*(volatile u32 *)(ring + i) = 0;
	mmio_write8(base + 0x14, 1);
	mmio_write8(base + 0x14, 3);
	mmio_write32(base + 0x00, 1);
	if (!(mmio_read32(base + 0x04) & 1))
		return "no VIRTIO_F_VERSION_1";
	mmio_write32(base + 0x08, 1);
	mmio_write32(base + 0x0c, 1);
	mmio_write32(base + 0x08, 0);
	mmio_write32(base + 0x0c, 0);
	mmio_write8(base + 0x14, 0xb);
	if (!(mmio_read8(base + 0x14) & 8))
		return "FEATURES_OK refused";
	if (msix)
		mmio_write16(base + 0x10, 0);		/* config vector */
	mmio_write16(base + 0x16, 0);
	if ((mmio_read32(base + 0x18) & 0xffff) < 8)
		return "queue 0 smaller than 8";
	mmio_write16(base + 0x18, 8);
	mmio_write16(base + 0x1a, msix ? 1 : 0xffff);
	mmio_write32(base + 0x20, ring);
	mmio_write32(base + 0x24, 0);
	mmio_write32(base + 0x28, ring + 0x1000);
	mmio_write32(base + 0x2c, 0);
	mmio_write32(base + 0x30, ring + 0x2000);
	mmio_write32(base + 0x34, 0);
	mmio_write16(base + 0x1c, 1);
	/* The buffer: descriptors at ring, data at ring + 0x3000. */
	if (dev == 0x1042) {
		/* virtio-blk GET_ID: header (read), 20-byte id (write), status (write). */
		u32 *d = (u32 *)ring;
		*(volatile u32 *)(ring + 0x3000) = 8;	/* type GET_ID */
		*(volatile u32 *)(ring + 0x3004) = 0;
		*(volatile u32 *)(ring + 0x3008) = 0;
		*(volatile u32 *)(ring + 0x300c) = 0;
		*(volatile u8 *)(ring + 0x3100) = 0xff;	/* status */
		d[0] = ring + 0x3000; d[1] = 0; d[2] = 16; d[3] = 1 | (1 << 16);
		d[4] = ring + 0x3040; d[5] = 0; d[6] = 20; d[7] = 1 | 2 | (2 << 16);
		d[8] = ring + 0x3100; d[9] = 0; d[10] = 1; d[11] = 2;
	} else {
		u32 *d = (u32 *)ring;
		d[0] = ring + 0x3000; d[1] = 0; d[2] = 16; d[3] = 2;	/* WRITE */
	}
	*(volatile u16 *)(ring + 0x1004) = 0;	/* avail ring[0] = head 0 */
	*(volatile u16 *)(ring + 0x1002) = 1;	/* avail idx */
	mmio_write8(base + 0x14, 0xf);
	if (!(mmio_read8(base + 0x14) & 4))
		return "DRIVER_OK not kept";
	mmio_write16(base + 0x3000, 0);		/* kick queue 0 */
	if (!wait)
		return 0;
	for (i = 0; i < LC_POLLS && *used_idx != 1; i++)
		(void)inb(0x2f0);		/* an exit: time for the worker */
	if (*used_idx != 1)
		return "the kicked buffer was never used";
	if (dev == 0x1042 && *(volatile u8 *)(ring + 0x3100) != 0)
		return "GET_ID did not complete with status 0";
	if (mmio_read8(base + 0x14) & 0x40)
		return "DEVICE_NEEDS_RESET";
	return 0;
}

static void mode_lifecycle(const struct opts *o)
{
	u32 dev, fn, n = 0, ok = 0;

	ecam_base = o->ecam ? o->ecam : 0xE0000000u;
	puts("=== LIFECYCLE start ===\n");
	for (dev = 1; dev < 32; dev++) {
		u32 multi = (cf8_read(dev << 3, 0x0c) >> 16) & 0x80;

		for (fn = 0; fn < (multi ? 8u : 1u); fn++) {
			u32 bdf = (dev << 3) | fn, id = cf8_read(bdf, 0);
			u32 devid = id >> 16, base, ring, msix, wait, round;
			const char *err = 0;

			if (!present(id) || (id & 0xffff) != 0x1af4)
				continue;
			base = lc_bar4(bdf);
			ring = LC_RINGS + n * 0x10000u;
			msix = !(n & 1) && lc_msix(bdf);
			/* rng and blk complete the kicked buffer; console and net hold it. */
			wait = devid == 0x1044 || devid == 0x1042;
			n++;
			for (round = 0; round < 2 && !err; round++) {
				err = lc_up(bdf, base, ring, msix, wait);
				if (!err && !lc_reset(base))
					err = "status never read 0 after reset";
			}
			puts("lifecycle: ");
			put_bdf(bdf);
			putc(' ');
			puthex(id & 0xffff, 4);
			putc(':');
			puthex(devid, 4);
			puts(msix ? " msi-x" : " intx");
			if (err) {
				puts(" FAILED: ");
				puts(err);
				putc('\n');
				continue;
			}
			ok++;
			puts(wait ? " up served reset up served reset ok\n" : " up kicked reset up kicked reset ok\n");
		}
	}
	puts("=== LIFECYCLE done functions=");
	putdec(n);
	puts(" ok=");
	putdec(ok);
	puts(" ===\n");
}

/*
 * ---- mode=enum [op=ecam|cf8] [ring=3] [hold=N] ----
 * A full enumeration as firmware and Linux do it, with nothing printed in between, so the host
 * can time it between two lines: every bus from 0, function 0 then 1..7 if multifunction, every
 * present function's 256 bytes of config space read (64 dwords), and every bridge numbered
 * depth first (primary = its bus, secondary = the next number, subordinate = 0xff while the
 * buses behind it are scanned, then the last number behind it), as SeaBIOS does and Linux does
 * when nobody did: a monitor that numbered its bridges already (our vmm) gets the same numbers
 * written again, one that did not (QEMU microvm) gets them now. Default op=ecam (QEMU microvm
 * has no CF8/CFC). Prints `=== ENUM op=OP start ===` and `=== ENUM op=OP done functions=N
 * bridges=B buses=K sum=0x... ===` (sum: the 32-bit sum of every dword read), then, with
 * hold=N, `=== ENUM hold ===` and N `inb` from `port` (null exits) before PROBE-DONE. With
 * decode=1, each endpoint's (header type 0) memory decoding is switched on as it is found, as
 * a driver's pci_enable_device() does (one more read and write; the done line adds
 * ` decoding=N`); a monitor that maps BARs and ioeventfds on decode then does so for all.
 * msix=1 (implies decode=1): then every MSI-X vector of the function (table in a 32-bit BAR in
 * the PCI window) gets an address, data and its mask cleared, as Linux writes them (` vectors=N`);
 * MSI-X itself stays disabled, nothing is delivered.
 */
static u32 enum_functions, enum_bridges, enum_sum, enum_next_bus;
static u32 enum_decode, enum_decoding, enum_msix, enum_vectors;

/* msix=1: every vector of `bdf`'s MSI-X table (a 32-bit BAR, decoding on) gets an address,
 * data and its mask bit cleared, as Linux's MSI-X setup writes them. */
static void enum_program_msix(cfg_read_fn rd, u32 bdf)
{
	u32 ptr = rd(bdf, 0x34) & 0xfc, guard = 0;

	while (ptr && guard++ < 48) {
		u32 v = rd(bdf, ptr);

		if ((v & 0xff) == 0x11) {
			u32 n = ((v >> 16) & 0x7ff) + 1, t = rd(bdf, ptr + 4);
			u32 bar = rd(bdf, 0x10 + 4 * (t & 7)), i;
			u32 base = (bar & ~0xfu) + (t & ~7u);

			if ((bar & 1) || (bar & ~0xfu) < 0xc0000000u || (bar & ~0xfu) >= ecam_base)
				return;
			for (i = 0; i < n; i++, base += 16) {
				mmio_write32(base, 0xfee00000u);
				mmio_write32(base + 4, 0);
				mmio_write32(base + 8, 0x40 + (enum_vectors & 0x7f));
				mmio_write32(base + 12, 0);
				enum_vectors++;
			}
			return;
		}
		ptr = (v >> 8) & 0xfc;
	}
}

static void enum_write(int cf8, u32 bdf, u32 off, u32 v)
{
	if (cf8)
		cf8_write(bdf, off, v);
	else
		mmio_write32(ecam_base + (bdf << 12) + (off & 0xffc), v);
}

struct enum_walk {
	int cf8;
	u32 bus, depth;
};

static void enum_bus(int cf8, u32 bus, u32 depth);

static void enum_visit(cfg_read_fn rd, u32 bdf, u32 id, void *ctx)
{
	const struct enum_walk *c = ctx;
	u32 hdr = 0, buses = 0, off, sec;

	enum_functions++;
	enum_sum += id;
	for (off = 4; off < 256; off += 4) {
		u32 v = rd(bdf, off);

		enum_sum += v;
		if (off == 0x0c)
			hdr = (v >> 16) & 0x7f;
		else if (off == 0x18)
			buses = v;
	}
	if (hdr == 0 && enum_decode) {
		/* command |= memory space, as a driver's pci_enable_device() does */
		enum_write(c->cf8, bdf, 0x04, (rd(bdf, 0x04) & 0xffffu) | 2);
		enum_decoding++;
		if (enum_msix)
			enum_program_msix(rd, bdf);
	}
	if (hdr != 1)
		return;
	enum_bridges++;
	if (c->depth >= 8 || enum_next_bus >= 255)
		return;
	sec = ++enum_next_bus;
	buses = (buses & 0xff000000u) | c->bus | (sec << 8);
	enum_write(c->cf8, bdf, 0x18, buses | 0x00ff0000u);
	enum_bus(c->cf8, sec, c->depth + 1);
	enum_write(c->cf8, bdf, 0x18, buses | (enum_next_bus << 16));
}

static void enum_bus(int cf8, u32 bus, u32 depth)
{
	struct enum_walk c = { cf8, bus, depth };

	each_function(cf8 ? cf8_read : ecam_read, bus, enum_visit, &c);
}

static void mode_enum(const struct opts *o)
{
	int cf8 = word_eq(o->op, "cf8");
	const char *op = cf8 ? "cf8" : "ecam";
	u16 port = (u16)o->port;
	volatile u32 sink;
	u32 i;

	ecam_base = o->ecam;
	enum_functions = enum_bridges = enum_sum = enum_next_bus = 0;
	enum_decode = o->decode || o->msix;
	enum_msix = o->msix;
	enum_decoding = enum_vectors = 0;
	puts("=== ENUM op=");
	puts(op);
	puts(" start ===\n");
	enum_bus(cf8, 0, 0);
	puts("=== ENUM op=");
	puts(op);
	puts(" done functions=");
	putdec(enum_functions);
	puts(" bridges=");
	putdec(enum_bridges);
	puts(" buses=");
	putdec(enum_next_bus + 1);
	puts(" sum=0x");
	puthex(enum_sum, 8);
	if (enum_decode) {
		puts(" decoding=");
		putdec(enum_decoding);
	}
	if (enum_msix) {
		puts(" vectors=");
		putdec(enum_vectors);
	}
	puts(" ===\n");
	if (o->hold) {
		puts("=== ENUM hold ===\n");
		for (i = 0; i < o->hold; i++)
			sink = inb(port);
		(void)sink;
	}
}

static void enum_user(void *arg)
{
	mode_enum((const struct opts *)arg);
	puts("=== PROBE-DONE ===\n");
	/* returns into probe_stop */
}

static void mode_bench(const struct opts *o)
{
	const char *ring = o->ring == 3 ? " ring=3" : "";
	u32 i, n = o->n;
	volatile u32 sink;

	puts("=== BENCH op=");
	put_word(o->op);
	puts(" n=");
	putdec(n);
	puts(ring);
	puts(" start ===\n");

	if (word_eq(o->op, "cf8")) {
		for (i = 0; i < n; i++) {
			outl(0xcf8, 0x80000000u);
			sink = inl(0xcfc);
		}
	} else if (word_eq(o->op, "ecam")) {
		u32 a = o->ecam;
		for (i = 0; i < n; i++)
			sink = mmio_read32(a);
	} else if (word_eq(o->op, "null")) {
		u16 port = (u16)o->port;
		for (i = 0; i < n; i++)
			sink = inb(port);
	} else {
		puts("=== BENCH unknown op ===\n");
	}
	(void)sink;

	puts("=== BENCH op=");
	put_word(o->op);
	puts(" n=");
	putdec(n);
	puts(ring);
	puts(" done ===\n");
}

/*
 * ---- mode=extcfg ----
 * Every function reachable through ECAM (bus 0, then behind each PCI-to-PCI
 * bridge; a bridge whose secondary bus number is 0 gets the next free bus
 * number, as firmware would): reads of the extended config space at
 * 0x100/0x104/0xffc (dword), 0x100/0x102/0xffe (word), 0x100/0x103/0xfff
 * (byte), then writes there (dword 0x12345678 at 0x100, word 0xabcd at 0x104,
 * byte 0x5a at 0xfff) and the same places read again; the header (0x00-0x3f,
 * through CF8) must not change. One line per function:
 *   extcfg: BB:DD.F VVVV:DDDD d100=.. d104=.. dffc=.. w100=.. w102=.. wffe=..
 *     b100=.. b103=.. bfff=.. after d100=.. w104=.. bfff=.. header same|CHANGED
 */
static u32 ext_next_bus;
static u32 ext_functions;

static u32 ext_addr(u32 bdf, u32 off)
{
	return ecam_base + (bdf << 12) + off;
}

static void ext_put(const char *name, u32 v, int digits)
{
	putc(' ');
	puts(name);
	putc('=');
	puthex(v, digits);
}

static void ext_function(u32 bdf, u32 id)
{
	u32 before[16], i, same = 1;

	for (i = 0; i < 16; i++)
		before[i] = cf8_read(bdf, 4 * i);
	puts("extcfg: ");
	put_bdf(bdf);
	putc(' ');
	puthex(id & 0xffff, 4);
	putc(':');
	puthex(id >> 16, 4);
	ext_put("d100", mmio_read32(ext_addr(bdf, 0x100)), 8);
	ext_put("d104", mmio_read32(ext_addr(bdf, 0x104)), 8);
	ext_put("dffc", mmio_read32(ext_addr(bdf, 0xffc)), 8);
	ext_put("w100", mmio_read16(ext_addr(bdf, 0x100)), 4);
	ext_put("w102", mmio_read16(ext_addr(bdf, 0x102)), 4);
	ext_put("wffe", mmio_read16(ext_addr(bdf, 0xffe)), 4);
	ext_put("b100", mmio_read8(ext_addr(bdf, 0x100)), 2);
	ext_put("b103", mmio_read8(ext_addr(bdf, 0x103)), 2);
	ext_put("bfff", mmio_read8(ext_addr(bdf, 0xfff)), 2);
	mmio_write32(ext_addr(bdf, 0x100), 0x12345678u);
	mmio_write16(ext_addr(bdf, 0x104), 0xabcd);
	mmio_write8(ext_addr(bdf, 0xfff), 0x5a);
	puts(" after");
	ext_put("d100", mmio_read32(ext_addr(bdf, 0x100)), 8);
	ext_put("w104", mmio_read16(ext_addr(bdf, 0x104)), 4);
	ext_put("bfff", mmio_read8(ext_addr(bdf, 0xfff)), 2);
	for (i = 0; i < 16; i++)
		if (cf8_read(bdf, 4 * i) != before[i])
			same = 0;
	puts(same ? " header same\n" : " header CHANGED\n");
	ext_functions++;
}

struct ext_walk {
	u32 bus, depth;
};

static void ext_bus(u32 bus, u32 depth);

static void ext_visit(cfg_read_fn rd, u32 bdf, u32 id, void *ctx)
{
	const struct ext_walk *c = ctx;
	u32 sec;

	ext_function(bdf, id);
	if (((rd(bdf, 0x0c) >> 16) & 0x7f) != 1 || c->depth >= 8)
		return;
	sec = (rd(bdf, 0x18) >> 8) & 0xff;
	if (!sec) {
		/* Unprogrammed (QEMU's firmware leaves it): number it. */
		sec = ++ext_next_bus;
		mmio_write32(ext_addr(bdf, 0x18), 0xff0000u | (sec << 8) | c->bus);
		ext_bus(sec, c->depth + 1);
		mmio_write32(ext_addr(bdf, 0x18),
			     (ext_next_bus << 16) | (sec << 8) | c->bus);
	} else if (sec > c->bus) {
		if (sec > ext_next_bus)
			ext_next_bus = sec;
		ext_bus(sec, c->depth + 1);
	}
}

static void ext_bus(u32 bus, u32 depth)
{
	struct ext_walk c = { bus, depth };

	each_function(ecam_read, bus, ext_visit, &c);
}

static void mode_extcfg(const struct opts *o)
{
	ecam_base = o->ecam ? o->ecam : 0xE0000000u;
	ext_next_bus = 0;
	ext_functions = 0;
	puts("=== EXTCFG start ===\n");
	ext_bus(0, 0);
	puts("=== EXTCFG done functions=");
	putdec(ext_functions);
	puts(" ===\n");
}

/* ring=3: the loop (and everything after it) runs at CPL3, IOPL 3. */
static void bench_user(void *arg)
{
	mode_bench((const struct opts *)arg);
	puts("=== PROBE-DONE ===\n");
	/* returns into probe_stop */
}

struct hvm_start_info {
	u32 magic;		/* 0x336ec578 */
	u32 version;
	u32 flags;
	u32 nr_modules;
	u32 modlist_paddr_lo, modlist_paddr_hi;
	u32 cmdline_paddr_lo, cmdline_paddr_hi;
	u32 rsdp_paddr_lo, rsdp_paddr_hi;
};

void probe_main(const struct hvm_start_info *si) __attribute__((noreturn));

void probe_main(const struct hvm_start_info *si)
{
	struct opts o;
	const char *cmdline = 0;

	if (si && si->magic == 0x336ec578u && si->cmdline_paddr_lo &&
	    !si->cmdline_paddr_hi)
		cmdline = (const char *)si->cmdline_paddr_lo;
	parse_cmdline(cmdline, &o);
	putc('\n');	/* firmware may have left the cursor mid-line */

	if (word_eq(o.mode, "hello")) {
		puts("Hello from the probe guest\n");
	} else if (word_eq(o.mode, "hostile")) {
		mode_hostile(&o);
	} else if (word_eq(o.mode, "hotplug")) {
		mode_hotplug(&o);
	} else if (word_eq(o.mode, "lifecycle")) {
		mode_lifecycle(&o);
	} else if (word_eq(o.mode, "enum")) {
		if (o.ring == 3)
			enter_user(enum_user, &o, user_stack_top);
		mode_enum(&o);
	} else if (word_eq(o.mode, "extcfg")) {
		mode_extcfg(&o);
	} else if (word_eq(o.mode, "bench")) {
		if (o.ring == 3)
			enter_user(bench_user, &o, user_stack_top);
		mode_bench(&o);
	} else {
		if (o.mode && !word_eq(o.mode, "probe")) {
			puts("probe: unknown mode '");
			put_word(o.mode);
			puts("', probing\n");
		}
		mode_probe(&o);
	}
	puts("=== PROBE-DONE ===\n");
	probe_stop();
}
