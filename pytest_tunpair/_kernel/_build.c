/* The spare namespace's builder, in C (pytest_tunpair._kernel._build).
 *
 * What SparePool's thread does for the next test (spare.py): a new network namespace for
 * the calling thread, its settings, lo up, the pair's two devices and the seed's routing
 * recipe -- the same steps, the same bytes (the requests are compiled by routing.py), in
 * one call that holds no GIL. In Python the build made ~90 system calls, each a release
 * and a re-take of the GIL, while the test thread ran Python: each re-take waited for the
 * test thread, and the build took 3.7 ms where it needs 1.5 (docs/internals.md, "What a
 * pair's set-up costs"). Here it runs beside the test, on the other CPU.
 *
 * build(sysctls, lo, devices, device_sysctls, expect, recipe, wait6, cleanup, timeout_ms)
 *   sysctls, device_sysctls: [(path under /proc/sys, value)], written before / after
 *     the devices are made;
 *   lo: the request that sets lo up;
 *   devices: [(name, TUNSETIFF flags, TUNSETOFFLOAD flags or -1)], two of them;
 *   expect: the ifindexes the recipe was compiled for (0: not known);
 *   recipe, cleanup: the recipe's requests, and those that move the IPv6 local routes
 *     once the kernel has added them (wait6: their packed addresses; timeout_ms for that);
 * returns ((namespace fd, its inode), ((fd, ifindex), (fd, ifindex)), /proc/thread-self/net/dev fd,
 * recipe_done, (ns_last_pid, forks) read before the namespace was made: procs.PidMark). recipe_done is False when the devices got other ifindexes than expected:
 * the caller then routes them itself, in the namespace this thread is now in. On failure
 * everything opened is closed and OSError(errno, "what failed") is raised; the thread stays
 * in the new namespace (it was made for that: SparePool's thread ends there).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_SYSCTLS 8
#define MAX_WAIT6 4
#define MAX_SEQS 64
#define RECV_SIZE 65536

typedef struct {
    char path[160];
    char value[24];
} Sysctl;

typedef struct {
    char name[IFNAMSIZ];
    int flags;
    int offload; /* -1: leave as is */
    int fd;
    int index;
} Device;

typedef struct {
    Sysctl pre[MAX_SYSCTLS];
    int n_pre;
    Sysctl post[MAX_SYSCTLS];
    int n_post;
    Device dev[2];
    int expect[2];
    const char *lo, *recipe, *cleanup;
    Py_ssize_t lo_len, recipe_len, cleanup_len;
    unsigned char wait6[MAX_WAIT6][16];
    int n_wait6, seen6[MAX_WAIT6];
    int timeout_ms;
    /* results */
    int ns_fd, counters_fd, nl, recipe_done;
    long last_pid, forks; /* -1: not known */
    unsigned long long ns_ino;
    int err;
    char what[192];
    unsigned char buf[RECV_SIZE];
} Build;

static int fail(Build *b, int err, const char *what) {
    b->err = err ? err : EIO;
    snprintf(b->what, sizeof b->what, "%s", what);
    return -1;
}

static ino_t current_ns(void) {
    struct stat st;
    return stat("/proc/thread-self/ns/net", &st) == 0 ? st.st_ino : 0;
}

static int write_sysctls(Build *b, const Sysctl *list, int n, ino_t ns) {
    for (int i = 0; i < n; i++) {
        /* Never the host's: only ever inside the namespace made above. */
        if (current_ns() != ns)
            return fail(b, EPERM, "refusing a sysctl outside the new namespace");
        char path[200];
        snprintf(path, sizeof path, "/proc/sys/%s", list[i].path);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0)
            return fail(b, errno, list[i].path);
        size_t len = strlen(list[i].value);
        ssize_t w = write(fd, list[i].value, len);
        int e = errno;
        close(fd);
        if (w != (ssize_t)len)
            return fail(b, w < 0 ? e : EIO, list[i].path);
    }
    return 0;
}

/* An IPv6 local route appearing in table local (RTM_NEWROUTE, as routing._Netlink._note). */
static void note_route(Build *b, const struct nlmsghdr *h) {
    if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct rtmsg)))
        return;
    const struct rtmsg *rt = NLMSG_DATA(h);
    if (rt->rtm_family != AF_INET6 || rt->rtm_type != RTN_LOCAL)
        return;
    unsigned table = rt->rtm_table;
    const unsigned char *dst = NULL;
    int attrlen = (int)h->nlmsg_len - (int)NLMSG_LENGTH(sizeof(struct rtmsg));
    for (const struct rtattr *a = RTM_RTA(rt); RTA_OK(a, attrlen); a = RTA_NEXT(a, attrlen)) {
        if (a->rta_type == RTA_DST && RTA_PAYLOAD(a) == 16)
            dst = RTA_DATA(a);
        else if (a->rta_type == RTA_TABLE && RTA_PAYLOAD(a) == 4)
            memcpy(&table, RTA_DATA(a), 4);
    }
    if (dst == NULL || table != RT_TABLE_LOCAL)
        return;
    for (int i = 0; i < b->n_wait6; i++)
        if (memcmp(dst, b->wait6[i], 16) == 0)
            b->seen6[i] = 1;
}

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Read one datagram (waiting up to timeout_ms); settle the acks of `seqs`, note routes.
 * Returns 1 if one came, 0 on timeout, -1 on error. *first_err: the first request's error. */
static int read_one(Build *b, const uint32_t *seqs, int *acked, int n, int *first_err,
                    int *failed_at, int timeout_ms) {
    struct pollfd p = {.fd = b->nl, .events = POLLIN};
    int r = poll(&p, 1, timeout_ms > 0 ? timeout_ms : 0); /* never -1: that waits for ever */
    if (r < 0)
        return errno == EINTR ? 0 : fail(b, errno, "poll (netlink)");
    if (r == 0)
        return 0;
    ssize_t got = recv(b->nl, b->buf, sizeof b->buf, 0);
    if (got < 0)
        return errno == EINTR ? 0 : fail(b, errno, "recv (netlink)");
    int len = (int)got;
    for (struct nlmsghdr *h = (struct nlmsghdr *)b->buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
        if (h->nlmsg_type == NLMSG_ERROR) {
            for (int i = 0; i < n; i++) {
                if (!acked[i] && seqs[i] == h->nlmsg_seq) {
                    acked[i] = 1;
                    const struct nlmsgerr *e = NLMSG_DATA(h);
                    if (e->error && *first_err == 0) {
                        *first_err = -e->error;
                        *failed_at = i;
                    }
                }
            }
        } else if (h->nlmsg_type == RTM_NEWROUTE) {
            note_route(b, h);
        }
    }
    return 1;
}

/* Send a buffer of requests in one message and wait for every one's ack (routing._Netlink.run). */
static int run_requests(Build *b, const char *data, Py_ssize_t size, const char *what) {
    if (size == 0)
        return 0;
    uint32_t seqs[MAX_SEQS];
    int acked[MAX_SEQS] = {0}, n = 0;
    for (Py_ssize_t off = 0; off + (Py_ssize_t)sizeof(struct nlmsghdr) <= size;) {
        const struct nlmsghdr *h = (const struct nlmsghdr *)(data + off);
        if (h->nlmsg_len < sizeof(struct nlmsghdr) || n == MAX_SEQS)
            return fail(b, EINVAL, "a malformed request buffer");
        seqs[n++] = h->nlmsg_seq;
        off += NLMSG_ALIGN(h->nlmsg_len);
    }
    if (send(b->nl, data, (size_t)size, 0) != size)
        return fail(b, errno, what);
    int first_err = 0, failed_at = -1, left = n;
    long deadline = now_ms() + 5000;
    while (left > 0) {
        int r = read_one(b, seqs, acked, n, &first_err, &failed_at, (int)(deadline - now_ms()));
        if (r < 0)
            return -1;
        if (r == 0 && now_ms() >= deadline)
            return fail(b, ETIMEDOUT, what);
        left = 0;
        for (int i = 0; i < n; i++)
            left += !acked[i];
    }
    if (first_err) {
        char where[192];
        snprintf(where, sizeof where, "%s, request %d", what, failed_at);
        return fail(b, first_err, where);
    }
    return 0;
}

static int wait_local6(Build *b) {
    long deadline = now_ms() + b->timeout_ms;
    for (;;) {
        int all = 1;
        for (int i = 0; i < b->n_wait6; i++)
            all &= b->seen6[i];
        if (all)
            return 0;
        long left = deadline - now_ms();
        if (left <= 0)
            return fail(b, ETIMEDOUT, "the kernel did not install an IPv6 local route");
        int first_err = 0, failed_at = -1;
        if (read_one(b, NULL, NULL, 0, &first_err, &failed_at, (int)left) < 0)
            return -1;
    }
}

static int make_device(Build *b, Device *d) {
    d->fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (d->fd < 0)
        return fail(b, errno, "open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, d->name, IFNAMSIZ);
    ifr.ifr_flags = (short)d->flags;
    if (ioctl(d->fd, TUNSETIFF, &ifr) < 0)
        return fail(b, errno, "TUNSETIFF");
    if (d->offload >= 0 && ioctl(d->fd, TUNSETOFFLOAD, (unsigned long)d->offload) < 0)
        return fail(b, errno, "TUNSETOFFLOAD");
    d->index = (int)if_nametoindex(d->name);
    if (d->index == 0)
        return fail(b, errno, "if_nametoindex");
    return 0;
}

/* The pid allocator's mark (procs.PidMark): ns_last_pid and /proc/stat's "processes". */
static long read_number(const char *path, const char *prefix) {
    /* /proc/stat's "intr" line, before "processes", grows with the interrupts: read it all. */
    size_t size = 16384, used = 0;
    char *text = malloc(size);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (text == NULL || fd < 0) {
        free(text);
        if (fd >= 0)
            close(fd);
        return -1;
    }
    for (;;) {
        if (used + 1 >= size) {
            char *bigger = size < (1 << 24) ? realloc(text, size * 2) : NULL;
            if (bigger == NULL)
                break;
            text = bigger;
            size *= 2;
        }
        ssize_t got = read(fd, text + used, size - used - 1);
        if (got <= 0)
            break;
        used += (size_t)got;
    }
    close(fd);
    text[used] = 0;
    long value = -1;
    const char *at = prefix == NULL ? text : strstr(text, prefix);
    if (at != NULL) {
        at += prefix == NULL ? 0 : strlen(prefix);
        char *end;
        long parsed = strtol(at, &end, 10);
        if (end != at)
            value = parsed;
    }
    free(text);
    return value;
}

static int build(Build *b) {
    b->last_pid = read_number("/proc/sys/kernel/ns_last_pid", NULL);
    b->forks = read_number("/proc/stat", "\nprocesses ");
    ino_t before = current_ns();
    if (unshare(CLONE_NEWNET) < 0)
        return fail(b, errno, "unshare(CLONE_NEWNET)");
    b->ns_fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (b->ns_fd < 0)
        return fail(b, errno, "open /proc/thread-self/ns/net");
    struct stat st;
    if (fstat(b->ns_fd, &st) < 0)
        return fail(b, errno, "fstat (namespace)");
    if (st.st_ino == before)
        return fail(b, EPERM, "unshare left the thread in its namespace");
    b->ns_ino = (unsigned long long)st.st_ino;
    if (write_sysctls(b, b->pre, b->n_pre, st.st_ino) < 0)
        return -1;
    b->nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (b->nl < 0)
        return fail(b, errno, "socket (netlink)");
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = RTMGRP_IPV6_ROUTE};
    if (bind(b->nl, (struct sockaddr *)&sa, sizeof sa) < 0)
        return fail(b, errno, "bind (netlink)");
    if (run_requests(b, b->lo, b->lo_len, "ip link set lo up") < 0)
        return -1;
    for (int i = 0; i < 2; i++)
        if (make_device(b, &b->dev[i]) < 0)
            return -1;
    if (write_sysctls(b, b->post, b->n_post, st.st_ino) < 0)
        return -1;
    if (b->expect[0] == b->dev[0].index && b->expect[1] == b->dev[1].index) {
        if (run_requests(b, b->recipe, b->recipe_len, "the routing recipe") < 0)
            return -1;
        if (b->n_wait6) {
            if (wait_local6(b) < 0)
                return -1;
            if (run_requests(b, b->cleanup, b->cleanup_len, "the IPv6 local routes") < 0)
                return -1;
        }
        b->recipe_done = 1;
    }
    b->counters_fd = open("/proc/thread-self/net/dev", O_RDONLY | O_CLOEXEC);
    if (b->counters_fd < 0)
        return fail(b, errno, "open /proc/thread-self/net/dev");
    return 0;
}

static void close_all(Build *b) {
    int *fds[] = {&b->counters_fd, &b->dev[1].fd, &b->dev[0].fd, &b->ns_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static int parse_sysctls(PyObject *list, Sysctl *out, int *n) {
    PyObject *seq = PySequence_Fast(list, "sysctls: a list of (path, value)");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count > MAX_SYSCTLS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many sysctls");
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *path, *value;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ss", &path, &value) ||
            strlen(path) >= sizeof out[i].path || strlen(value) >= sizeof out[i].value) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a sysctl path or value is too long");
            Py_DECREF(seq);
            return -1;
        }
        strcpy(out[i].path, path);
        strcpy(out[i].value, value);
    }
    *n = (int)count;
    Py_DECREF(seq);
    return 0;
}

static PyObject *py_build(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *pre, *devices, *post, *wait6;
    Build *b = PyMem_Calloc(1, sizeof(Build));
    if (b == NULL)
        return PyErr_NoMemory();
    b->ns_fd = b->counters_fd = b->nl = b->dev[0].fd = b->dev[1].fd = -1;
    if (!PyArg_ParseTuple(args, "Oy#OO(ii)y#Oy#i", &pre, &b->lo, &b->lo_len, &devices, &post,
                          &b->expect[0], &b->expect[1], &b->recipe, &b->recipe_len, &wait6,
                          &b->cleanup, &b->cleanup_len, &b->timeout_ms) ||
        parse_sysctls(pre, b->pre, &b->n_pre) < 0 || parse_sysctls(post, b->post, &b->n_post) < 0)
        goto error;
    PyObject *devs = PySequence_Fast(devices, "devices: two (name, flags, offload)");
    if (devs == NULL)
        goto error;
    if (PySequence_Fast_GET_SIZE(devs) != 2) {
        Py_DECREF(devs);
        PyErr_SetString(PyExc_ValueError, "devices: two (name, flags, offload)");
        goto error;
    }
    for (int i = 0; i < 2; i++) {
        const char *name;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(devs, i), "sii", &name, &b->dev[i].flags,
                              &b->dev[i].offload) ||
            strlen(name) >= IFNAMSIZ) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a device name is too long");
            Py_DECREF(devs);
            goto error;
        }
        strcpy(b->dev[i].name, name);
    }
    Py_DECREF(devs);
    PyObject *addrs = PySequence_Fast(wait6, "wait6: packed IPv6 addresses");
    if (addrs == NULL)
        goto error;
    if (PySequence_Fast_GET_SIZE(addrs) > MAX_WAIT6) {
        Py_DECREF(addrs);
        PyErr_SetString(PyExc_ValueError, "wait6: too many addresses");
        goto error;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(addrs); i++) {
        PyObject *a = PySequence_Fast_GET_ITEM(addrs, i);
        if (!PyBytes_Check(a) || PyBytes_GET_SIZE(a) != 16) {
            Py_DECREF(addrs);
            PyErr_SetString(PyExc_ValueError, "wait6: 16-byte addresses");
            goto error;
        }
        memcpy(b->wait6[i], PyBytes_AS_STRING(a), 16);
        b->n_wait6++;
    }
    Py_DECREF(addrs);

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = build(b);
    if (b->nl >= 0)
        close(b->nl);
    if (rc < 0)
        close_all(b);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyObject *exc = Py_BuildValue("(is)", b->err, b->what);
        if (exc != NULL) {
            PyErr_SetObject(PyExc_OSError, exc);
            Py_DECREF(exc);
        }
        goto error;
    }
    PyObject *result = Py_BuildValue("((iK)((ii)(ii))iO(ll))", b->ns_fd, b->ns_ino,
                                     b->dev[0].fd, b->dev[0].index, b->dev[1].fd,
                                     b->dev[1].index, b->counters_fd,
                                     b->recipe_done ? Py_True : Py_False, b->last_pid, b->forks);
    if (result == NULL)
        close_all(b);
    PyMem_Free(b);
    return result;
error:
    PyMem_Free(b);
    return NULL;
}

/* release(fds): each device fd made persistent, then closed (device.release_fd), with
 * no GIL held: the four calls take the kernel's RTNL lock, and may wait for it. */
static PyObject *py_release(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "release: a list of fds");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int fds[8];
    if (n > 8) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "release: at most 8 fds");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        fds[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (fds[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        (void)ioctl(fds[i], TUNSETPERSIST, 1); /* refused: it unregisters now, still right */
        if (close(fds[i]) < 0 && errno == EBADF)
            bad = fds[i] + 1;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* pid_mark(): (ns_last_pid, forks since boot), procs.PidMark's two numbers, read with no
 * GIL held (six system calls: in Python, six waits for the GIL beside a busy thread). */
static PyObject *py_pid_mark(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    long last, forks;
    Py_BEGIN_ALLOW_THREADS
    last = read_number("/proc/sys/kernel/ns_last_pid", NULL);
    forks = read_number("/proc/stat", "\nprocesses ");
    Py_END_ALLOW_THREADS
    if (last < 0 || forks < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(ll)", last, forks);
}

static PyMethodDef methods[] = {
    {"pid_mark", py_pid_mark, METH_NOARGS,
     "pid_mark() -> (ns_last_pid, forks) or None: procs.PidMark's numbers"},
    {"release", py_release, METH_O,
     "release(fds): make each device persistent and close its fd (device.release_fd)"},
    {"build", py_build, METH_VARARGS,
     "build(sysctls, lo, devices, device_sysctls, expect, recipe, wait6, cleanup, timeout_ms)"
     " -> ((ns_fd, ns_inode), ((fd, index), (fd, index)), counters_fd, recipe_done,"
     " (last_pid, forks)):"
     " a spare namespace"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_build", "The spare namespace's builder in C (spare.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__build(void) { return PyModule_Create(&module); }
