/* The relay's C core: the per-packet loop for directions that are plain or only delayed.
 *
 * What it is for: the relay thread's Python loop costs ~15 us of interpreter time per packet
 * and per wake-up, more than the kernel's own work on a packet (docs/timing.md, "Where the
 * relay's time goes"). While both directions have nothing configured but (at most) a
 * constant delay -- the state of most tests, and of every plain pair -- the relay thread
 * calls Core.run(), which polls, reads, holds and writes here without the GIL, and returns
 * as soon as anything else is asked of the relay (its wake-up pipe becomes readable).
 *
 * What it keeps the same as the Python loop (pytest_tunpair/_link/relay.py):
 * - Every packet is recorded before it is written, and a reader never sees its action
 *   change: records go to `log` under `mu`, which is held across the batch's writes. The
 *   capture pulls the log (Core.pull) each time its lock is taken (capture.py, PullLock),
 *   so whoever looks at the capture or the counters sees what was written.
 * - A delayed direction is the Python path's drop-tail queue without a rate: packets leave
 *   `delay` after they arrived (see "Arrival times"), in order; the queue's bound (packets,
 *   bytes; a GSO super-packet counts as its segments) drops what arrives over it.
 * - Waiters on the capture (wait_for, expect, wait_new) are woken: while Python says some
 *   wait (`waiters`), each batch ends with a call of `notify` (with the GIL).
 * - When run() returns, the packets it still holds (delayed, not yet due) are handed back
 *   to the Python loop, which delivers them on time (or records them dropped at stop).
 *
 * Locks: `mu` guards the log and the counters. The relay thread never waits for it holding
 * the GIL, and pull() waits for it without the GIL (then takes the GIL holding it), so the
 * two never wait for each other.
 *
 * Arrival times: a delayed direction's delay counts from the moment the packet entered its
 * source device, not from the moment this thread read it (0.05-0.1 ms later when the thread
 * slept: docs/internals.md, "Waking from idle is late"). While a direction is delayed here,
 * a packet socket hooked to its source device with a TPACKET_V2 ring lets packets in, and
 * the kernel stamps every packet the device is sent as it passes the device's taps, just
 * before the TUN queue (docs/internals.md, "A packet socket stamps what a device is
 * sent"). Setting a ring up and releasing one each wait for an RCU grace period (~15 ms):
 * Python calls prepare_stamps() on a thread of its own the first time a direction is
 * delayed (the core runs with read times meanwhile), and after close() (which closes the
 * fds at once: the ring's mapping keeps the socket) release() on another (relay.py,
 * core.py). Between, the core turns stamping on and off by swapping the socket's filter. A packet read from
 * the device takes the stamp of the first ring entry with its length and first bytes;
 * entries of packets the device dropped are passed over, and a packet with no entry
 * (stamps off, the ring full) keeps its read time. See `Stamp`. What the relay's sleep
 * added is taken out, and only that: a packet that entered while the relay was busy
 * (reading, holding, writing others) counts from the moment the relay was next ready to
 * read (`ready_at`, when it last entered ppoll), as a packet waits for a link's
 * transmitter -- so a relay saturated by bulk traffic still adds its backlog to the delay,
 * as the Python loop does, instead of hiding the delay behind it.
 *
 * Timing: the wait for the next departure is a ppoll() with a nanosecond timeout (an
 * hrtimer). Waking from a long idle sleep costs ~0.1 ms on these machines
 * (docs/internals.md, "Waking from idle is late"), so a wait longer than SPIN_AFTER
 * ends SPIN early and the rest is spent polling the devices without sleeping.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE (65536 + 256)
#define BURST 64
#define ACT_FORWARDED 0
#define ACT_DELAYED 1
#define ACT_DROPPED 2
/* A record pulled by Python or handed over at these sizes of the log (packets, bytes). */
#define LOG_PACKETS 4096
#define LOG_BYTES (8 * 1024 * 1024)
/* virtio-net header: gso_type is byte 1; TCPV4 1, TCPV6 4, the ECN bit 0x80. */
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80

/* A stamp ring's frames: each holds a tpacket2_hdr, the link-layer address and the first
 * STAMP_SNAP bytes of the packet (enough to tell packets apart: headers, some payload). */
#define STAMP_SNAP 128
#define STAMP_FRAME 256
#define STAMP_BLOCK 4096
/* A miss that scanned this many entries forgets them all: whatever is in the ring then does
 * not match what the device queue holds, and scanning it again for every packet would cost. */
#define STAMP_MAX_SCAN 64

typedef struct Rec {
    struct Rec *next;
    double time;    /* written (or dropped), seconds since t0 */
    double arrival; /* read, seconds since t0 */
    double due;     /* monotonic seconds: when it may leave */
    long count;     /* wire packets it stands for (a GSO super-packet: its segments) */
    long size;      /* wire bytes (without the virtio-net header) */
    int dir;
    int action;
    Py_ssize_t len;
    unsigned char data[];
} Rec;

typedef struct {
    Rec *head;
    Rec *tail;
} List;

typedef struct {
    long long packets, bytes, dropped;
    long peak;
} Counts;

typedef struct {
    double delay; /* < 0: plain */
    long limit;   /* < 0: no bound */
    long limit_bytes;
    long held;    /* packets (segments) held, the queue's units */
    long held_bytes;
} Dir;

/* A device's packet socket and its ring (see the header). Only the relay thread touches
 * a Stamp while run() runs; close() and release() come after it stopped. */
typedef struct {
    int fd;          /* the packet socket, -1: not opened (yet) */
    int ifindex;     /* the source device, in the relay thread's namespace; 0: no stamps */
    int off;         /* stamps are off for good: failed, or closed */
    int ready;       /* stamp_prepare() is done: the relay thread may use the Stamp */
    unsigned char *ring;
    size_t ring_len;
    unsigned frames; /* a power of two */
    unsigned head;   /* the oldest frame not given back to the kernel */
    int bound;       /* stamping now (the filter lets packets in) */
    double last;     /* the last arrival given, seconds since t0 (arrivals never go back) */
    long long stamped, missed;
} Stamp;

typedef struct {
    PyObject_HEAD
    int fds[2];
    int wake_fd;
    int hdr;
    double t0;
    pthread_mutex_t mu; /* log, log_n, log_bytes, counts */
    List log;
    long log_n;
    long log_bytes;
    Counts counts[2];
    List fifo[2]; /* the relay thread's (run) */
    long fifo_n[2];
    int pending; /* packets in the fifos: read by any thread */
    int waiters; /* set by Python: someone waits on the capture */
    double spin;
    double spin_after;
    long long runs;
    long long exits; /* read by any thread */
    int running;     /* read by any thread */
    Stamp stamps[2];
    unsigned stamp_frames; /* each ring's frames */
    double ready_at;       /* the relay thread's: when it last entered ppoll, since t0 */
} Core;

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void list_push(List *l, Rec *r) {
    r->next = NULL;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static Rec *list_pop(List *l) {
    Rec *r = l->head;
    if (r) {
        l->head = r->next;
        if (!l->head)
            l->tail = NULL;
        r->next = NULL;
    }
    return r;
}

static void list_free(List *l) {
    Rec *r;
    while ((r = list_pop(l)))
        free(r);
}

/* Errors that mean "this packet did not go through" (relay.py's _DROP_ERRNOS). */
static int drop_errno(int e) {
    return e == EIO || e == ENOBUFS || e == EAGAIN || e == EINVAL || e == EMSGSIZE ||
           e == EFAULT || e == ENOMEM || e == EBADFD;
}

/* Close the socket, for good. While the ring is mapped this is cheap: the mapping keeps
 * the socket, whose release (an RCU grace period) comes with stamp_unmap. */
static void stamp_close(Stamp *s) {
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    s->bound = 0;
    s->ready = 0;
    s->off = 1;
}

static void stamp_unmap(Stamp *s) {
    if (s->ring)
        munmap(s->ring, s->ring_len);
    s->ring = NULL;
}

static void Core_dealloc(Core *self) {
    for (int i = 0; i < 2; i++) {
        stamp_close(&self->stamps[i]);
        stamp_unmap(&self->stamps[i]);
    }
    list_free(&self->log);
    list_free(&self->fifo[0]);
    list_free(&self->fifo[1]);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Core_init(Core *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd_a",    "fd_b",    "wake_fd",      "hdr_len", "t0",
                             "index_a", "index_b", "stamp_frames", NULL};
    int index[2] = {0, 0};
    unsigned frames = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiid|iiI", kwlist, &self->fds[0],
                                     &self->fds[1], &self->wake_fd, &self->hdr, &self->t0,
                                     &index[0], &index[1], &frames))
        return -1;
    if (frames < STAMP_BLOCK / STAMP_FRAME || (frames & (frames - 1))) {
        PyErr_SetString(PyExc_ValueError, "stamp_frames: a power of two >= 16");
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        memset(&self->stamps[i], 0, sizeof(Stamp));
        self->stamps[i].fd = -1;
        self->stamps[i].ifindex = index[i];
        self->stamps[i].off = index[i] <= 0;
    }
    self->stamp_frames = frames;
    pthread_mutex_init(&self->mu, NULL);
    self->spin = 150e-6;
    self->spin_after = 1e-3;
    return 0;
}

static int is_tcp_gso(Core *self, Rec *r) {
    if (self->hdr < 10 || r->len < self->hdr)
        return 0;
    int gso_type = r->data[1] & ~GSO_ECN;
    int gso_size = r->data[4] | (r->data[5] << 8);
    return gso_size && (gso_type == GSO_TCPV4 || gso_type == GSO_TCPV6);
}

/* The wire size and segment count of a frame: `size_fn(frame)` for a TCP GSO super-packet
 * (the Python parser, exact for every header chain). With the GIL. */
static int wire_size(Core *self, PyObject *size_fn, Rec *r) {
    PyObject *frame = PyBytes_FromStringAndSize((char *)r->data, r->len);
    if (!frame)
        return -1;
    PyObject *res = PyObject_CallOneArg(size_fn, frame);
    Py_DECREF(frame);
    if (!res)
        return -1;
    long size, count;
    int ok = PyArg_ParseTuple(res, "ll", &size, &count);
    Py_DECREF(res);
    if (!ok)
        return -1;
    r->size = size;
    r->count = count;
    return 0;
}

/* Append `out` (in order) to the log, then write each; under `mu`. Returns 0, or an errno
 * that is not a drop (the loop raises it). */
static int emit(Core *self, List *out) {
    int err = 0;
    pthread_mutex_lock(&self->mu);
    double t = now_mono() - self->t0;
    for (Rec *r = out->head; r; r = r->next) {
        /* What nothing held is stamped once, when read (relay.py's fast path: sojourn 0). */
        r->time = r->action == ACT_FORWARDED ? r->arrival : t;
    }
    Rec *first = out->head;
    if (first) {
        if (self->log.tail)
            self->log.tail->next = first;
        else
            self->log.head = first;
        self->log.tail = out->tail;
    }
    for (Rec *r = first; r; r = r->next) {
        Counts *c = &self->counts[r->dir];
        self->log_n++;
        self->log_bytes += (long)r->len;
        if (r->action == ACT_DROPPED) {
            c->dropped++;
            continue;
        }
        ssize_t n = write(self->fds[1 - r->dir], r->data, (size_t)r->len);
        if (n < 0) {
            if (!drop_errno(errno) && !err)
                err = errno;
            r->action = ACT_DROPPED;
            c->dropped++;
            continue;
        }
        c->packets++;
        c->bytes += (long long)r->len - self->hdr;
    }
    pthread_mutex_unlock(&self->mu);
    out->head = out->tail = NULL;
    return err;
}

static int64_t clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static struct tpacket2_hdr *stamp_frame(Stamp *s, unsigned i) {
    return (struct tpacket2_hdr *)(s->ring + (size_t)(i & (s->frames - 1)) * STAMP_FRAME);
}

/* Give the `n` oldest frames back to the kernel. */
static void stamp_release(Stamp *s, unsigned n) {
    for (; n > 0; n--, s->head = (s->head + 1) & (s->frames - 1))
        __atomic_store_n(&stamp_frame(s, s->head)->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
}

/* Give back every frame the kernel filled: what it stamped before now is of packets that
 * were read elsewhere (the Python loop) or are in the device queue unstamped-for. */
static void stamp_flush(Stamp *s) {
    unsigned k = 0;
    for (; k < s->frames; k++)
        if (!(__atomic_load_n(&stamp_frame(s, s->head + k)->tp_status, __ATOMIC_ACQUIRE) &
              TP_STATUS_USER))
            break;
    stamp_release(s, k);
}

static int stamp_filter(Stamp *s, int keep) {
    /* keep: outgoing packets only (a write into the device passes its taps too), cut to
     * STAMP_SNAP bytes; else none. Swapping a socket's filter is cheap (no grace period),
     * unlike unhooking it from the device. */
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PKTTYPE)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, STAMP_SNAP),
        BPF_STMT(BPF_RET | BPF_K, 0),
    };
    struct sock_fprog prog = {4, code};
    if (!keep) {
        prog.len = 1;
        prog.filter = &code[3];
    }
    return setsockopt(s->fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog);
}

/* Open the device's packet socket, its ring, and hook it to the device, filtering out
 * everything (stamp_start lets packets in). Any thread but the relay's, without the GIL:
 * setting a ring up waits for an RCU grace period (~15 ms, packet_set_ring()), which the
 * relay thread must not (its packets would wait). The relay thread uses the Stamp once
 * `ready` is set. A failure turns the device's stamps off (read times). */
static void stamp_prepare(Stamp *s, unsigned frames) {
    if (s->off || __atomic_load_n(&s->ready, __ATOMIC_ACQUIRE))
        return;
    /* Protocol 0: hooked to nothing until bound. */
    s->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        s->off = 1; /* not allowed here (no CAP_NET_RAW) */
        return;
    }
    int version = TPACKET_V2;
    struct tpacket_req req = {STAMP_BLOCK, frames / (STAMP_BLOCK / STAMP_FRAME), STAMP_FRAME,
                              frames};
    void *ring = MAP_FAILED;
    if (stamp_filter(s, 0) == 0 &&
        setsockopt(s->fd, SOL_PACKET, PACKET_VERSION, &version, sizeof version) == 0 &&
        setsockopt(s->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) == 0)
        ring = mmap(NULL, (size_t)frames * STAMP_FRAME, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd,
                    0);
    if (ring == MAP_FAILED) {
        stamp_close(s);
        return;
    }
    s->ring = ring;
    s->ring_len = (size_t)frames * STAMP_FRAME;
    s->frames = frames;
    s->head = 0;
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = s->ifindex;
    if (bind(s->fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        stamp_close(s);
        return;
    }
    __atomic_store_n(&s->ready, 1, __ATOMIC_RELEASE);
}

/* Stamp what the device is sent from now on (the relay thread): let packets into the ring,
 * forget older entries. */
static void stamp_start(Stamp *s) {
    if (!__atomic_load_n(&s->ready, __ATOMIC_ACQUIRE) || s->bound)
        return;
    if (stamp_filter(s, 1) < 0)
        return; /* read times this time */
    __atomic_store_n(&s->bound, 1, __ATOMIC_RELAXED);
    stamp_flush(s);
}

/* Stop stamping: the Python loop reads the device meanwhile. */
static void stamp_stop(Stamp *s) {
    if (s->bound && stamp_filter(s, 0) == 0)
        __atomic_store_n(&s->bound, 0, __ATOMIC_RELAXED);
}

/* When `data` (`len` bytes, read from the device at `read_at`) entered the device, in
 * seconds since t0; `read_at` if its entry is not in the ring. `off` is CLOCK_REALTIME
 * minus CLOCK_MONOTONIC, in ns (the ring's stamps are wall-clock times). */
static double stamp_arrival(Core *self, Stamp *s, const unsigned char *data, size_t len,
                            double read_at, int64_t off) {
    if (!s->bound)
        return read_at;
    unsigned k = 0;
    for (; k < s->frames; k++) {
        struct tpacket2_hdr *h = stamp_frame(s, s->head + k);
        if (!(__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
            break;
        size_t snap = h->tp_snaplen < len ? h->tp_snaplen : len;
        if (h->tp_len != len || h->tp_mac + snap > STAMP_FRAME ||
            memcmp((unsigned char *)h + h->tp_mac, data, snap) != 0)
            continue;
        int64_t wall = (int64_t)h->tp_sec * 1000000000 + h->tp_nsec;
        stamp_release(s, k + 1);
        double at = (double)(wall - off) * 1e-9 - self->t0;
        /* Never after the read, never before the relay was ready to read it, never before
         * the previous packet's arrival. */
        if (at > read_at)
            at = read_at;
        if (at < self->ready_at)
            at = self->ready_at;
        if (at < s->last)
            at = s->last;
        s->last = at;
        s->stamped++;
        return at;
    }
    if (k >= STAMP_MAX_SCAN)
        stamp_release(s, k);
    s->missed++;
    if (read_at > s->last)
        s->last = read_at;
    return read_at;
}

/* Read what device `dir` holds (up to BURST packets) into `out` (plain) or its fifo
 * (delayed). Returns 0, or an errno that is not a drop. Needs the GIL only for a GSO
 * super-packet on a bounded delayed direction (wire_size), taking it from `*ts`. */
static int take(Core *self, int dir, Dir *d, List *out, PyObject *size_fn, PyThreadState **ts) {
    int64_t off = 0;
    int have_off = 0;
    for (int i = 0; i < BURST; i++) {
        Rec *r = malloc(sizeof(Rec) + READ_SIZE);
        if (!r)
            return ENOMEM;
        ssize_t n = read(self->fds[dir], r->data, READ_SIZE);
        if (n <= 0) {
            int e = n < 0 ? errno : 0;
            free(r);
            if (n < 0 && e != EAGAIN && e != EWOULDBLOCK && e != EINTR && !drop_errno(e))
                return e;
            return 0;
        }
        if (n < READ_SIZE - 4096) { /* give the rest back (relay.py's COPY_BELOW) */
            Rec *small = realloc(r, sizeof(Rec) + (size_t)n);
            if (small)
                r = small;
        }
        double now = now_mono();
        r->len = n;
        r->dir = dir;
        r->arrival = now - self->t0;
        r->count = 1;
        r->size = (long)(n - self->hdr);
        if (d->delay < 0) {
            r->action = ACT_FORWARDED;
            list_push(out, r);
            continue;
        }
        if (self->stamps[dir].bound) {
            if (!have_off) {
                off = clock_ns(CLOCK_REALTIME) - clock_ns(CLOCK_MONOTONIC);
                have_off = 1;
            }
            r->arrival = stamp_arrival(self, &self->stamps[dir], r->data + self->hdr,
                                       (size_t)(n - self->hdr), r->arrival, off);
        }
        if (d->limit >= 0 || d->limit_bytes >= 0) {
            if (is_tcp_gso(self, r)) {
                PyEval_RestoreThread(*ts);
                int bad = wire_size(self, size_fn, r);
                *ts = PyEval_SaveThread();
                if (bad) {
                    free(r);
                    return -1;
                }
            }
            /* drop-tail: an empty direction always takes a packet, however large */
            if (d->held > 0 && ((d->limit >= 0 && d->held + r->count > d->limit) ||
                                (d->limit_bytes >= 0 && d->held_bytes + r->size > d->limit_bytes))) {
                r->action = ACT_DROPPED;
                list_push(out, r);
                continue;
            }
        }
        r->action = ACT_DELAYED;
        r->due = r->arrival + self->t0 + d->delay;
        d->held += r->count;
        d->held_bytes += r->size;
        list_push(&self->fifo[dir], r);
        self->fifo_n[dir]++;
        __atomic_add_fetch(&self->pending, 1, __ATOMIC_RELAXED);
        Counts *c = &self->counts[dir];
        if (d->held > c->peak) {
            pthread_mutex_lock(&self->mu);
            c->peak = d->held;
            pthread_mutex_unlock(&self->mu);
        }
    }
    return 0;
}

/* Move what is due by `now` from the fifos to `out`. */
static void release(Core *self, Dir *dirs, double now, List *out) {
    for (int dir = 0; dir < 2; dir++) {
        List *f = &self->fifo[dir];
        while (f->head && f->head->due <= now) {
            Rec *r = list_pop(f);
            self->fifo_n[dir]--;
            __atomic_sub_fetch(&self->pending, 1, __ATOMIC_RELAXED);
            dirs[dir].held -= r->count;
            dirs[dir].held_bytes -= r->size;
            list_push(out, r);
        }
    }
}

static double next_due(Core *self) {
    double due = -1;
    for (int dir = 0; dir < 2; dir++) {
        Rec *h = self->fifo[dir].head;
        if (h && (due < 0 || h->due < due))
            due = h->due;
    }
    return due;
}

static int parse_dir(PyObject *spec, Dir *d) {
    d->held = d->held_bytes = 0;
    if (spec == Py_None) {
        d->delay = -1;
        d->limit = d->limit_bytes = -1;
        return 0;
    }
    if (!PyArg_ParseTuple(spec, "dll", &d->delay, &d->limit, &d->limit_bytes))
        return -1;
    if (d->delay < 0) {
        PyErr_SetString(PyExc_ValueError, "a delay must be >= 0");
        return -1;
    }
    return 0;
}

/* Core.run(a_to_b, b_to_a, size_fn, notify) -> list of (dir, due, arrival, bytes) */
static PyObject *Core_run(Core *self, PyObject *args) {
    PyObject *spec[2], *size_fn, *notify;
    Dir dirs[2];
    if (!PyArg_ParseTuple(args, "OOOO", &spec[0], &spec[1], &size_fn, &notify))
        return NULL;
    if (parse_dir(spec[0], &dirs[0]) || parse_dir(spec[1], &dirs[1]))
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Core.run() is already running");
        return NULL;
    }
    __atomic_store_n(&self->running, 1, __ATOMIC_SEQ_CST);
    self->runs++;
    int err = 0, pyerr = 0;
    List out = {NULL, NULL};
    struct pollfd p[3] = {{self->fds[0], POLLIN, 0}, {self->fds[1], POLLIN, 0},
                          {self->wake_fd, POLLIN, 0}};
    PyThreadState *ts = PyEval_SaveThread();
    for (int dir = 0; dir < 2; dir++) {
        if (dirs[dir].delay > 0)
            stamp_start(&self->stamps[dir]);
        else
            stamp_stop(&self->stamps[dir]);
    }
    for (;;) {
        double due = next_due(self);
        double spin_until = -1;
        int ready;
        self->ready_at = now_mono() - self->t0;
        if (due < 0) {
            ready = ppoll(p, 3, NULL, NULL);
        } else {
            double wait = due - now_mono();
            int spin = wait > self->spin_after;
            if (spin)
                wait -= self->spin;
            if (wait < 0)
                wait = 0;
            struct timespec tmo = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
            ready = ppoll(p, 3, &tmo, NULL);
            if (ready == 0 && spin)
                spin_until = due;
        }
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        /* The last stretch of a long wait: poll the devices without sleeping. */
        while (spin_until > 0 && ready == 0) {
            struct timespec zero = {0, 0};
            ready = ppoll(p, 3, &zero, NULL);
            if (ready < 0 && errno != EINTR) {
                err = errno;
                break;
            }
            if (ready < 0)
                ready = 0;
            if (now_mono() >= spin_until)
                break;
        }
        if (err)
            break;
        if (ready > 0 && (p[2].revents & POLLIN))
            break; /* the Python loop reads the pipe and does what was asked */
        release(self, dirs, now_mono(), &out);
        for (int dir = 0; dir < 2 && !err && !pyerr; dir++) {
            if (ready > 0 && (p[dir].revents & (POLLIN | POLLERR | POLLHUP))) {
                int e = take(self, dir, &dirs[dir], &out, size_fn, &ts);
                if (e < 0)
                    pyerr = 1;
                else if (e)
                    err = e;
            }
        }
        /* What the reads made due at once (a zero delay) leaves with them. */
        release(self, dirs, now_mono(), &out);
        if (out.head) {
            int e = emit(self, &out);
            if (e && !err)
                err = e;
        }
        if (pyerr || err)
            break;
        if ((__atomic_load_n(&self->waiters, __ATOMIC_RELAXED) > 0 && self->log.head) ||
            self->log_n >= LOG_PACKETS || self->log_bytes >= LOG_BYTES) {
            PyEval_RestoreThread(ts);
            PyObject *res = PyObject_CallNoArgs(notify);
            if (!res)
                pyerr = 1;
            Py_XDECREF(res);
            ts = PyEval_SaveThread();
            if (pyerr)
                break;
        }
    }
    /* Read but not yet out when an error ended the loop: recorded (and written) all the
     * same, never lost. Without the GIL: pull() holds `mu` while it waits for the GIL. */
    if (out.head)
        emit(self, &out);
    stamp_stop(&self->stamps[0]);
    stamp_stop(&self->stamps[1]);
    __atomic_add_fetch(&self->exits, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&self->running, 0, __ATOMIC_SEQ_CST);
    PyEval_RestoreThread(ts);
    /* What is still held goes back to the Python loop, earliest first per direction. */
    PyObject *held = PyList_New(0);
    for (int dir = 0; dir < 2; dir++) {
        Rec *r;
        while ((r = list_pop(&self->fifo[dir]))) {
            __atomic_sub_fetch(&self->pending, 1, __ATOMIC_RELAXED);
            if (held) {
                PyObject *item = Py_BuildValue("(iddy#)", dir, r->due, r->arrival,
                                               (char *)r->data, r->len);
                if (!item || PyList_Append(held, item) < 0)
                    Py_CLEAR(held);
                Py_XDECREF(item);
            }
            free(r);
        }
        self->fifo_n[dir] = 0;
    }
    if (pyerr) {
        Py_XDECREF(held);
        return NULL;
    }
    if (err) {
        Py_XDECREF(held);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return held;
}

/* One record's metadata in pull()'s second blob: _packets/packet.py's BATCH_RECORD,
 * "<ddQIBBxx" (time, arrival, offset of its frame in the first blob, length, direction,
 * action). */
typedef struct __attribute__((packed)) {
    double time, arrival;
    unsigned long long offset;
    unsigned int len;
    unsigned char dir, action, pad[2];
} Meta;

/* Core.pull() -> (frames, meta, counts) or None: what was recorded since the last pull --
 * the frames end to end in one bytes object and a Meta per record in another, so that no
 * Python object is made per packet (the capture's PacketBatch makes them when read) --
 * and the counters' increments per direction ((packets, bytes, dropped, peak), ...). Waits
 * (without the GIL) for a batch being written, so the actions are final. */
static PyObject *Core_pull(Core *self, PyObject *Py_UNUSED(ignored)) {
    List log;
    Counts counts[2];
    long n, nbytes;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    Py_END_ALLOW_THREADS
    log = self->log;
    n = self->log_n;
    nbytes = self->log_bytes;
    memcpy(counts, self->counts, sizeof counts);
    int empty = !log.head && !counts[0].packets && !counts[1].packets && !counts[0].dropped &&
                !counts[1].dropped && !counts[0].peak && !counts[1].peak;
    self->log.head = self->log.tail = NULL;
    self->log_n = self->log_bytes = 0;
    memset(self->counts, 0, sizeof self->counts);
    pthread_mutex_unlock(&self->mu);
    if (empty)
        Py_RETURN_NONE;
    PyObject *frames = PyBytes_FromStringAndSize(NULL, nbytes);
    PyObject *meta = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Meta));
    char *fp = frames ? PyBytes_AS_STRING(frames) : NULL;
    Meta *mp = meta ? (Meta *)PyBytes_AS_STRING(meta) : NULL;
    unsigned long long offset = 0;
    Rec *r;
    while ((r = list_pop(&log))) {
        if (fp && mp) {
            memcpy(fp + offset, r->data, (size_t)r->len);
            mp->time = r->time;
            mp->arrival = r->arrival;
            mp->offset = offset;
            mp->len = (unsigned int)r->len;
            mp->dir = (unsigned char)r->dir;
            mp->action = (unsigned char)r->action;
            mp->pad[0] = mp->pad[1] = 0;
            mp++;
            offset += (unsigned long long)r->len;
        }
        free(r);
    }
    if (!frames || !meta) {
        Py_XDECREF(frames);
        Py_XDECREF(meta);
        return NULL;
    }
    return Py_BuildValue("(NN((LLLl)(LLLl)))", frames, meta, counts[0].packets, counts[0].bytes,
                         counts[0].dropped, counts[0].peak, counts[1].packets, counts[1].bytes,
                         counts[1].dropped, counts[1].peak);
}

static PyObject *Core_get_pending(Core *self, void *closure) {
    return PyLong_FromLong(__atomic_load_n(&self->pending, __ATOMIC_RELAXED));
}

static PyObject *Core_get_waiters(Core *self, void *closure) {
    return PyLong_FromLong(__atomic_load_n(&self->waiters, __ATOMIC_RELAXED));
}

static int Core_set_waiters(Core *self, PyObject *value, void *closure) {
    long v = value ? PyLong_AsLong(value) : 0;
    if (v == -1 && PyErr_Occurred())
        return -1;
    __atomic_store_n(&self->waiters, (int)v, __ATOMIC_RELAXED);
    return 0;
}

static PyObject *Core_get_runs(Core *self, void *closure) { return PyLong_FromLongLong(self->runs); }

static PyObject *Core_get_exits(Core *self, void *closure) {
    return PyLong_FromLongLong(__atomic_load_n(&self->exits, __ATOMIC_SEQ_CST));
}

static PyObject *Core_get_running(Core *self, void *closure) {
    return PyBool_FromLong(__atomic_load_n(&self->running, __ATOMIC_SEQ_CST));
}

static PyObject *Core_get_spin(Core *self, void *closure) {
    return Py_BuildValue("(dd)", self->spin, self->spin_after);
}

static int Core_set_spin(Core *self, PyObject *value, void *closure) {
    double spin, after;
    if (!value || !PyArg_ParseTuple(value, "dd", &spin, &after))
        return -1;
    if (spin < 0 || after < spin) {
        PyErr_SetString(PyExc_ValueError, "spin: (seconds >= 0, after >= seconds)");
        return -1;
    }
    self->spin = spin;
    self->spin_after = after;
    return 0;
}

static PyObject *Core_get_stamps(Core *self, void *closure) {
    Stamp *a = &self->stamps[0], *b = &self->stamps[1];
    return Py_BuildValue("((iLL)(iLL))", __atomic_load_n(&a->bound, __ATOMIC_RELAXED), a->stamped,
                         a->missed, __atomic_load_n(&b->bound, __ATOMIC_RELAXED), b->stamped,
                         b->missed);
}

/* Core.prepare_stamps(a, b): open the stamp sockets and rings of the directions asked for
 * (see stamp_prepare), without the GIL; from a thread of its own, one at a time. Returns
 * whether each direction can stamp. */
static PyObject *Core_prepare_stamps(Core *self, PyObject *args) {
    int want[2];
    if (!PyArg_ParseTuple(args, "pp", &want[0], &want[1]))
        return NULL;
    unsigned frames = self->stamp_frames;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < 2; i++)
        if (want[i])
            stamp_prepare(&self->stamps[i], frames);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ii)", __atomic_load_n(&self->stamps[0].ready, __ATOMIC_ACQUIRE),
                         __atomic_load_n(&self->stamps[1].ready, __ATOMIC_ACQUIRE));
}

/* Core.close() -> bool: close the stamp sockets' fds (the relay thread has stopped); True
 * if rings are still mapped, for release(). */
static PyObject *Core_close(Core *self, PyObject *Py_UNUSED(ignored)) {
    if (__atomic_load_n(&self->running, __ATOMIC_SEQ_CST)) {
        PyErr_SetString(PyExc_RuntimeError, "Core.close() while run() runs");
        return NULL;
    }
    for (int i = 0; i < 2; i++)
        stamp_close(&self->stamps[i]);
    return PyBool_FromLong(self->stamps[0].ring || self->stamps[1].ring);
}

/* Core.release(): unmap the stamp rings, after close(); the sockets go with them, after an
 * RCU grace period (~15 ms), without the GIL. */
static PyObject *Core_release(Core *self, PyObject *Py_UNUSED(ignored)) {
    if (self->stamps[0].fd >= 0 || self->stamps[1].fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Core.release() before close()");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    stamp_unmap(&self->stamps[0]);
    stamp_unmap(&self->stamps[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyGetSetDef Core_getset[] = {
    {"stamps", (getter)Core_get_stamps, NULL,
     "Per direction (on, stamped, missed): whether run() stamps arrivals now, how many "
     "packets took a stamp, how many kept their read time.",
     NULL},
    {"pending", (getter)Core_get_pending, NULL, "Packets held (delayed) right now.", NULL},
    {"waiters", (getter)Core_get_waiters, (setter)Core_set_waiters,
     "Threads waiting on the capture: while > 0, each batch calls notify.", NULL},
    {"runs", (getter)Core_get_runs, NULL, "How many times run() was entered.", NULL},
    {"exits", (getter)Core_get_exits, NULL, "How many times run() returned (any thread).",
     NULL},
    {"running", (getter)Core_get_running, NULL, "run() is relaying now (any thread may ask).",
     NULL},
    {"spin", (getter)Core_get_spin, (setter)Core_set_spin,
     "(seconds, after): a wait longer than `after` ends `seconds` early and polls.", NULL},
    {NULL},
};

static PyMethodDef Core_methods[] = {
    {"run", (PyCFunction)Core_run, METH_VARARGS,
     "run(a_to_b, b_to_a, size_fn, notify): relay until the wake-up fd is readable; each "
     "direction None (plain) or (delay, limit, limit_bytes); returns the packets still held "
     "as (dir, due, arrival, frame)."},
    {"pull", (PyCFunction)Core_pull, METH_NOARGS,
     "pull(): (frames, meta, counts) recorded since the last pull, or None."},
    {"prepare_stamps", (PyCFunction)Core_prepare_stamps, METH_VARARGS,
     "prepare_stamps(a_to_b, b_to_a) -> (bool, bool): open the arrival-stamp sockets and "
     "rings asked for (~15 ms: call it on a thread); run() stamps with them from its next "
     "entry."},
    {"close", (PyCFunction)Core_close, METH_NOARGS,
     "close() -> bool: close the stamp sockets (run() stamps no more); True if release() "
     "is still to be called."},
    {"release", (PyCFunction)Core_release, METH_NOARGS,
     "release(): unmap the stamp rings after close() (~15 ms: call it on a thread)."},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pytest_tunpair._link._core.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The relay's C loop for plain and delay-only directions (see _core.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_core", "The relay's C core (see _core.c's header).", -1, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "FORWARDED", ACT_FORWARDED);
    PyModule_AddIntConstant(m, "DELAYED", ACT_DELAYED);
    PyModule_AddIntConstant(m, "DROPPED", ACT_DROPPED);
    PyModule_AddIntConstant(m, "META_SIZE", (long)sizeof(Meta));
    return m;
}
