/*
 * proxyvpn._fastpath — the per-packet fast path: parse, checksum, build segments,
 * batched reads and writes on the TUN fd.
 *
 * Its pure-Python twin is proxyvpn/netstack/wire.py: same names, same results, same
 * exception types, proved byte for byte by tests/unit/test_fastpath_agree.py. The
 * order of the checks in parse() is documented there and mirrored exactly here, since
 * the first failing check decides the drop code.
 *
 * Every byte parsed here comes from an untrusted peer (any local app can send anything
 * into the TUN), so every read is bounds-checked against the buffer length first, all
 * lengths are size_t, and nothing is read outside [buf, buf + len).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* TCP flag bits (RFC 9293 §3.1; ECE and CWR from RFC 3168 §6.1). */
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10
#define TH_URG 0x20
#define TH_ECE 0x40
#define TH_CWR 0x80

enum drop_reason {
    DROP_OK = 0,
    DROP_TRUNCATED,
    DROP_BAD_VERSION,
    DROP_BAD_IP_HEADER,
    DROP_FRAGMENT,
    DROP_NOT_TCP,
    DROP_BAD_IP_CHECKSUM,
    DROP_BAD_TCP_HEADER,
    DROP_BAD_TCP_CHECKSUM,
    DROP_BAD_OPTIONS,
    DROP_BAD_ADDRESS,
    DROP_COUNT
};

static const char *const drop_names[DROP_COUNT] = {
    "ok",          "truncated",       "bad_version",      "bad_ip_header",
    "fragment",    "not_tcp",         "bad_ip_checksum",  "bad_tcp_header",
    "bad_tcp_checksum", "bad_options", "bad_address",
};

#define PROTO_TCP 6
#define IPV6_FRAGMENT 44
#define DEFAULT_TTL 64
#define IPV4_DF 0x4000
#define MAX_IP_LEN 0xffffu
/* A GSO packet may be longer than its 16-bit length field can say ("BIG TCP"). IPv4
 * (Linux 6.3+): the field is 0 and the skb's length counts. IPv6: the field is 0 and a
 * Hop-by-Hop header with a Jumbo Payload option (RFC 2675) holds the length, which is
 * what the kernel's own GRO built until Linux 7.0. Up to the kernel's GSO_MAX_SIZE
 * (8 * 65535, include/linux/netdevice.h), headers included. Same in wire.py. */
#define BIG_IP_LEN_MAX 524280u
#define JUMBO_HBH_LEN 8 /* next header, length 0, option 0xC2, length 4, 32-bit length */
#define IPV6_TLV_JUMBO 0xC2
#define MAX_TCP_OPTIONS 40 /* RFC 9293 §3.1: what the data offset can describe */
#define MAX_SACK_BLOCKS 4  /* RFC 2018 §3: what 40 bytes of options can hold */
/* virtio_net_hdr (include/uapi/linux/virtio_net.h), prepended to every packet read
 * from or written to a TUN opened with IFF_VNET_HDR. Legacy virtio: fields in the
 * host's byte order (the TUN is not switched with TUNSETVNETLE/BE). */
#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1 /* checksum is partial: only the pseudo-header is summed */
#define VNET_F_DATA_VALID 2 /* the kernel already verified the checksum */
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
/* read_batch allocates max_packets * bufsize in one go; cap it (same in wire.py). */
#define READ_BATCH_MAX_BYTES (64LL * 1024 * 1024)

/* ------------------------------------------------------------------ byte helpers */

static inline unsigned get16(const uint8_t *p) { return ((unsigned)p[0] << 8) | p[1]; }

static inline uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* ------------------------------------------------------------------ checksum */

/* Add with end-around carry: keeps the sum congruent modulo 2**64 - 1, a multiple of
 * 0xffff, and never turns a non-zero sum into zero (RFC 1071 §2(A), §4.1). */
static inline uint64_t add_carry(uint64_t a, uint64_t b)
{
    a += b;
    return a + (a < b);
}

/* One's-complement sum of p[0..n) in *native* byte order. RFC 1071 §2(B): the sum
 * is byte-order independent, so loading words natively and swapping the folded
 * 16-bit result once gives the network-order sum. RFC 1071 §2(C) "deferred carries":
 * 32-bit words go into four independent 64-bit accumulators (no per-add carry
 * handling, so the adds pipeline and vectorise: ~2x the speed of a 64-bit
 * add-with-carry chain), folded together once per block of at most 1 GiB so they can
 * never overflow (2**30 / 16 words of < 2**32 each stay below 2**58). memcpy loads
 * are alignment-safe and compile to plain moves. */
static uint64_t sum_native(const uint8_t *p, size_t n)
{
    uint64_t acc = 0;

    while (n >= 32) {
        size_t block = n & ~(size_t)31;
        uint64_t a = 0, b = 0, c = 0, d = 0;
        uint32_t w[8];
        if (block > ((size_t)1 << 30))
            block = (size_t)1 << 30;
        n -= block;
        for (; block; block -= 32, p += 32) {
            memcpy(w, p, 32);
            a += w[0];
            b += w[1];
            c += w[2];
            d += w[3];
            a += w[4];
            b += w[5];
            c += w[6];
            d += w[7];
        }
        acc = add_carry(acc, a + b + c + d);
    }
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc = add_carry(acc, w);
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc = add_carry(acc, w);
        p += 2;
        n -= 2;
    }
    if (n) {
        /* Odd trailing byte: it sits at an even offset, i.e. it is the high-order byte
         * of a word padded with zero (RFC 1071 §4.1); loading it into the first byte
         * of a zeroed native word is exactly that in either byte order. */
        uint16_t w = 0;
        memcpy(&w, p, 1);
        acc = add_carry(acc, w);
    }
    return acc;
}

/* Fold a 64-bit one's-complement sum to 16 bits (non-zero stays non-zero). */
static inline unsigned fold16(uint64_t s)
{
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    return (unsigned)s;
}

/* Folded (not complemented) one's-complement sum of p[0..n) as a network-order value. */
static inline unsigned net_sum(const uint8_t *p, size_t n)
{
    return ntohs((uint16_t)fold16(sum_native(p, n)));
}

/* Internet checksum of p[0..n) plus a partial sum `initial`: ready to store. */
static inline unsigned inet_csum(const uint8_t *p, size_t n, uint64_t initial)
{
    return ~fold16(add_carry(initial, net_sum(p, n))) & 0xffffu;
}

/* Word sum of the TCP pseudo-header minus the length (RFC 9293 §3.1, RFC 8200 §8.1);
 * the zero bytes contribute nothing, so both families reduce to src + dst + proto. */
static inline uint64_t pseudo_sum(const uint8_t *src, const uint8_t *dst, size_t alen)
{
    return (uint64_t)net_sum(src, alen) + net_sum(dst, alen) + PROTO_TCP;
}

/* ------------------------------------------------------------------ argument parsing */

/* Map METH_FASTCALL positional + keyword arguments onto `nmax` named slots (borrowed
 * references; NULL for an absent optional one). Mirrors a Python signature whose
 * parameters are all positional-or-keyword, the first `nreq` of them required. */
static int get_args(const char *fname, const char *const *names, Py_ssize_t nmax,
                    Py_ssize_t nreq, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames, PyObject **out)
{
    Py_ssize_t i, k;

    for (i = 0; i < nmax; i++)
        out[i] = NULL;
    if (nargs > nmax) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     fname, nmax, nargs);
        return -1;
    }
    for (i = 0; i < nargs; i++)
        out[i] = args[i];
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (k = 0; k < nkw; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            for (i = 0; i < nmax; i++)
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
                    break;
            if (i == nmax) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, key);
                return -1;
            }
            if (out[i] != NULL) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                             fname, names[i]);
                return -1;
            }
            out[i] = args[nargs + k];
        }
    }
    for (i = 0; i < nreq; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

/* operator.index(o) checked against [lo, hi]: TypeError for non-integers, ValueError
 * for anything outside (including ints too large for a long long), as in wire._int. */
static int get_int(PyObject *o, long long lo, long long hi, const char *name, long long *out)
{
    int overflow = 0;
    long long v;
    PyObject *idx = PyNumber_Index(o);

    if (idx == NULL)
        return -1;
    v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s out of range [%lld, %lld]", name, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------ checksum() */

PyDoc_STRVAR(checksum_doc,
"checksum($module, /, data, initial=0)\n--\n\n"
"RFC 1071 internet checksum of data (odd length padded with zero) plus a\n"
"non-negative partial sum `initial` (< 2**64), folded and complemented.");

static PyObject *fp_checksum(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    static const char *const names[] = {"data", "initial"};
    PyObject *a[2];
    Py_buffer view;
    unsigned long long initial = 0;
    unsigned result;

    if (get_args("checksum", names, 2, 1, args, nargs, kwnames, a) < 0)
        return NULL;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (a[1] != NULL) {
        PyObject *idx = PyNumber_Index(a[1]);
        if (idx == NULL)
            goto fail;
        initial = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
        if (initial == (unsigned long long)-1 && PyErr_Occurred()) {
            /* Negative or >= 2**64: a range error, as in wire.checksum. */
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "initial out of range [0, 2**64)");
            }
            goto fail;
        }
    }
    result = inet_csum((const uint8_t *)view.buf, (size_t)view.len, initial);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(result);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* ------------------------------------------------------------------ parse() */

typedef struct {
    int family;
    const uint8_t *src, *dst;
    size_t alen;
    unsigned sport, dport, flags, window, mss;
    uint32_t seq, ack;
    size_t payload_start, payload_end;
    int wscale, sack;
    long long tsval; /* -1: no Timestamps option */
    uint32_t tsecr;
} parsed_t;

/* Multicast 224/4 (RFC 5771), limited broadcast, unspecified (RFC 1122 §3.2.1.3). */
static inline int bad_v4(const uint8_t *a)
{
    static const uint8_t zero[4] = {0}, bcast[4] = {0xff, 0xff, 0xff, 0xff};
    return (a[0] & 0xf0) == 0xe0 || memcmp(a, bcast, 4) == 0 || memcmp(a, zero, 4) == 0;
}

/* Multicast ff00::/8 (RFC 4291 §2.7) or unspecified :: (RFC 4291 §2.5.2). */
static inline int bad_v6(const uint8_t *a)
{
    static const uint8_t zero[16] = {0};
    return a[0] == 0xff || memcmp(a, zero, 16) == 0;
}

/* The validation chain; the order is the contract documented in wire.py. */
static int parse_packet(const uint8_t *b, size_t n, int verify, parsed_t *r)
{
    size_t off, end, tcp_len, thl, i, oend;
    const uint8_t *t;

    if (n < 1)
        return DROP_TRUNCATED;
    if ((b[0] >> 4) == 4) {
        size_t hlen;
        if (n < 20)
            return DROP_TRUNCATED;
        hlen = (size_t)(b[0] & 0x0f) * 4;
        if (hlen < 20)
            return DROP_BAD_IP_HEADER;
        if (n < hlen)
            return DROP_TRUNCATED;
        /* RFC 791 §3.1: the total length delimits the datagram; link padding after it
         * is ignored, a length past the buffer is a lie. */
        end = get16(b + 2);
        if (end < hlen || end > n)
            return DROP_BAD_IP_HEADER;
        if (verify && inet_csum(b, hlen, 0) != 0)
            return DROP_BAD_IP_CHECKSUM;
        if (get16(b + 6) & 0x3fff) /* MF or fragment offset: RFC 791 §3.2 */
            return DROP_FRAGMENT;
        if (b[9] != PROTO_TCP)
            return DROP_NOT_TCP;
        if (bad_v4(b + 12) || bad_v4(b + 16))
            return DROP_BAD_ADDRESS;
        r->family = 4;
        r->src = b + 12;
        r->dst = b + 16;
        r->alen = 4;
        off = hlen;
    } else if ((b[0] >> 4) == 6) {
        unsigned nxt;
        if (n < 40)
            return DROP_TRUNCATED;
        end = 40 + (size_t)get16(b + 4);
        if (end > n)
            return DROP_BAD_IP_HEADER;
        nxt = b[6];
        off = 40;
        /* RFC 8200 §4: hop-by-hop, routing and destination options all carry Next
         * Header then Hdr Ext Len in 8-octet units, not counting the first 8. Each is
         * at least 8 bytes, so this loop is bounded by the payload length. */
        while (nxt == 0 || nxt == 43 || nxt == 60) {
            size_t ext_len;
            if (off + 2 > end)
                return DROP_BAD_IP_HEADER;
            ext_len = ((size_t)b[off + 1] + 1) * 8;
            if (off + ext_len > end)
                return DROP_BAD_IP_HEADER;
            nxt = b[off];
            off += ext_len;
        }
        if (nxt == IPV6_FRAGMENT)
            return DROP_FRAGMENT;
        if (nxt != PROTO_TCP)
            return DROP_NOT_TCP;
        if (bad_v6(b + 8) || bad_v6(b + 24))
            return DROP_BAD_ADDRESS;
        r->family = 6;
        r->src = b + 8;
        r->dst = b + 24;
        r->alen = 16;
    } else {
        return DROP_BAD_VERSION;
    }

    /* Here off <= end <= n holds on both paths. */
    tcp_len = end - off;
    if (tcp_len < 20)
        return DROP_TRUNCATED;
    t = b + off;
    thl = (size_t)(t[12] >> 4) * 4;
    if (thl < 20 || thl > tcp_len)
        return DROP_BAD_TCP_HEADER;
    if (verify && inet_csum(t, tcp_len, pseudo_sum(r->src, r->dst, r->alen) + tcp_len) != 0)
        return DROP_BAD_TCP_CHECKSUM;

    r->sport = get16(t);
    r->dport = get16(t + 2);
    r->seq = get32(t + 4);
    r->ack = get32(t + 8);
    r->flags = t[13];
    r->window = get16(t + 14);
    r->payload_start = off + thl;
    r->payload_end = end;
    r->mss = 0;
    r->wscale = -1;
    r->sack = 0;
    r->tsval = -1;
    r->tsecr = 0;

    /* Options, RFC 9293 §3.2: kinds 0 and 1 are one octet; all others carry a length
     * octet that counts kind and length. Later duplicates override earlier ones. */
    i = 20;
    oend = thl;
    while (i < oend) {
        unsigned kind = t[i], olen;
        if (kind == 0) /* End of Option List */
            break;
        if (kind == 1) { /* No-Operation */
            i++;
            continue;
        }
        if (i + 1 >= oend)
            return DROP_BAD_OPTIONS;
        olen = t[i + 1];
        if (olen < 2 || i + olen > oend)
            return DROP_BAD_OPTIONS;
        if (kind == 2) { /* MSS, RFC 9293 §3.7.1 */
            if (olen != 4)
                return DROP_BAD_OPTIONS;
            r->mss = get16(t + i + 2);
        } else if (kind == 3) { /* Window Scale, RFC 7323 §2.2 */
            if (olen != 3)
                return DROP_BAD_OPTIONS;
            r->wscale = t[i + 2];
        } else if (kind == 4) { /* SACK-Permitted, RFC 2018 §2 */
            if (olen != 2)
                return DROP_BAD_OPTIONS;
            r->sack = 1;
        } else if (kind == 8) { /* Timestamps, RFC 7323 §3.2 */
            if (olen != 10)
                return DROP_BAD_OPTIONS;
            r->tsval = get32(t + i + 2);
            r->tsecr = get32(t + i + 6);
        }
        i += olen;
    }
    return DROP_OK;
}

PyDoc_STRVAR(parse_doc,
"parse($module, /, packet, verify_checksum=True, vnet=False)\n--\n\n"
"Validate one raw IPv4/IPv6 TCP packet. Returns (family, src, dst, sport, dport,\n"
"seq, ack, flags, window, payload_start, payload_end, mss, wscale, sack_permitted,\n"
"tsval, tsecr) or a positive DROP_* code (tsval -1 and tsecr 0 without a Timestamps\n"
"option); never raises for any bytes. With vnet the packet starts\n"
"with a 10-byte virtio_net_hdr (offsets stay relative to the whole buffer); when it\n"
"says NEEDS_CSUM or DATA_VALID the kernel vouches for the TCP checksum, so it is not\n"
"verified (it holds only the pseudo-header sum).");

static PyObject *fp_parse(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    static const char *const names[] = {"packet", "verify_checksum", "vnet"};
    PyObject *a[3], *res;
    Py_buffer view;
    parsed_t r;
    int verify = 1, vnet = 0, code;
    const uint8_t *b;
    size_t n, skip = 0;

    if (get_args("parse", names, 3, 1, args, nargs, kwnames, a) < 0)
        return NULL;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((a[1] != NULL && (verify = PyObject_IsTrue(a[1])) < 0) ||
        (a[2] != NULL && (vnet = PyObject_IsTrue(a[2])) < 0)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    b = (const uint8_t *)view.buf;
    n = (size_t)view.len;
    if (vnet) {
        if (n < VNET_HDR_LEN) {
            PyBuffer_Release(&view);
            return PyLong_FromLong(DROP_TRUNCATED);
        }
        if (b[0] & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID))
            verify = 0;
        skip = VNET_HDR_LEN;
    }
    code = parse_packet(b + skip, n - skip, verify, &r);
    if (code != DROP_OK) {
        res = PyLong_FromLong(code);
    } else {
        /* "N" steals the new references; on failure Py_BuildValue drops them. */
        res = Py_BuildValue("(iNNIIkkIInniiOLk)", r.family,
                            PyBytes_FromStringAndSize((const char *)r.src, (Py_ssize_t)r.alen),
                            PyBytes_FromStringAndSize((const char *)r.dst, (Py_ssize_t)r.alen),
                            r.sport, r.dport, (unsigned long)r.seq, (unsigned long)r.ack,
                            r.flags, r.window, (Py_ssize_t)(r.payload_start + skip),
                            (Py_ssize_t)(r.payload_end + skip), (int)r.mss, r.wscale,
                            r.sack ? Py_True : Py_False, r.tsval, (unsigned long)r.tsecr);
    }
    PyBuffer_Release(&view);
    return res;
}

/* ------------------------------------------------------------------ build() */

/* Everything a segment of one flow shares; pseudo is the length-less pseudo-header
 * sum, computed once per call. */
typedef struct {
    int family;
    const uint8_t *src, *dst;
    unsigned sport, dport, window;
    uint32_t ack;
    uint64_t pseudo;
} flow_t;

/* Validated arguments shared by build() and build_many(). */
typedef struct {
    flow_t f;
    uint32_t seq;
    unsigned flags;
    Py_buffer src, dst, payload;
    int have_src, have_dst, have_payload;
} build_args_t;

static void release_build_args(build_args_t *b)
{
    if (b->have_src)
        PyBuffer_Release(&b->src);
    if (b->have_dst)
        PyBuffer_Release(&b->dst);
    if (b->have_payload)
        PyBuffer_Release(&b->payload);
}

/* Validate the nine leading fields and the payload, in signature order (wire.py
 * validates in the same order, so both raise the same exception for the same call). */
static int get_build_args(PyObject **a, build_args_t *b)
{
    long long family, sport, dport, seq, ack, flags, window;
    size_t alen;

    memset(b, 0, sizeof(*b));
    if (get_int(a[0], LLONG_MIN, LLONG_MAX, "family", &family) < 0)
        return -1;
    if (family != 4 && family != 6) {
        PyErr_Format(PyExc_ValueError, "family must be 4 or 6: %lld", family);
        return -1;
    }
    alen = family == 4 ? 4 : 16;
    if (PyObject_GetBuffer(a[1], &b->src, PyBUF_SIMPLE) < 0)
        return -1;
    b->have_src = 1;
    if ((size_t)b->src.len != alen) {
        PyErr_Format(PyExc_ValueError, "src must be %zu bytes for IPv%lld", alen, family);
        return -1;
    }
    if (PyObject_GetBuffer(a[2], &b->dst, PyBUF_SIMPLE) < 0)
        return -1;
    b->have_dst = 1;
    if ((size_t)b->dst.len != alen) {
        PyErr_Format(PyExc_ValueError, "dst must be %zu bytes for IPv%lld", alen, family);
        return -1;
    }
    if (get_int(a[3], 0, 0xffff, "sport", &sport) < 0 ||
        get_int(a[4], 0, 0xffff, "dport", &dport) < 0 ||
        get_int(a[5], 0, 0xffffffffLL, "seq", &seq) < 0 ||
        get_int(a[6], 0, 0xffffffffLL, "ack", &ack) < 0 ||
        get_int(a[7], 0, 0xff, "flags", &flags) < 0 ||
        get_int(a[8], 0, 0xffff, "window", &window) < 0)
        return -1;
    if (a[9] != NULL) {
        if (PyObject_GetBuffer(a[9], &b->payload, PyBUF_SIMPLE) < 0)
            return -1;
        b->have_payload = 1;
    }
    b->f.family = (int)family;
    b->f.src = (const uint8_t *)b->src.buf;
    b->f.dst = (const uint8_t *)b->dst.buf;
    b->f.sport = (unsigned)sport;
    b->f.dport = (unsigned)dport;
    b->f.window = (unsigned)window;
    b->f.ack = (uint32_t)ack;
    b->f.pseudo = pseudo_sum(b->f.src, b->f.dst, alen);
    b->seq = (uint32_t)seq;
    b->flags = (unsigned)flags;
    return 0;
}

/* Largest TCP segment (header + payload) the IP length field can describe. */
static inline size_t max_tcp_len(int family) { return family == 4 ? MAX_IP_LEN - 20 : MAX_IP_LEN; }

/* One packet: a single PyBytes allocation, headers written in place, payload copied
 * once, checksums computed over the finished bytes (still hot in cache). The caller
 * guarantees the sizes fit. */
static PyObject *emit(const flow_t *f, uint32_t seq, unsigned flags, const uint8_t *opts,
                      size_t optlen, const uint8_t *payload, size_t paylen, long gso_size,
                      PyObject *split)
{
    size_t thl = 20 + optlen, tcp_len = thl + paylen;
    int jumbo = f->family == 6 && tcp_len > MAX_IP_LEN; /* only a GSO packet gets here */
    size_t ip_hlen = f->family == 4 ? 20 : 40 + (jumbo ? JUMBO_HBH_LEN : 0);
    size_t total = ip_hlen + tcp_len;
    size_t vlen = gso_size >= 0 ? VNET_HDR_LEN : 0;
    /* split (only with a partial checksum, which never reads the payload): the headers
     * alone, paired with the payload object for a gathered write -- no payload copy. */
    size_t alloc = split != NULL ? vlen + ip_hlen + thl : vlen + total;
    PyObject *pkt = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)alloc);
    uint8_t *p, *t;

    if (pkt == NULL)
        return NULL;
    p = (uint8_t *)PyBytes_AS_STRING(pkt);
    if (vlen) {
        /* Checksum offload: the kernel treats CHECKSUM_PARTIAL as verified on local
         * delivery and completes it if the packet leaves a real NIC, so the payload is
         * never summed here. A segment larger than gso_size (the app's MSS) goes as one
         * GSO packet: the kernel takes 64 KiB in one write and splits it only if it
         * must (forwarding); local TCP receives it whole, like a GRO packet. */
        uint16_t v;
        int gso = gso_size > 0 && paylen > (size_t)gso_size;
        p[0] = VNET_F_NEEDS_CSUM;
        p[1] = gso ? (f->family == 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6) : VNET_GSO_NONE;
        v = (uint16_t)(ip_hlen + thl);
        memcpy(p + 2, &v, 2);
        v = (uint16_t)(gso ? gso_size : 0);
        memcpy(p + 4, &v, 2);
        v = (uint16_t)ip_hlen;
        memcpy(p + 6, &v, 2);
        v = 16; /* offsetof(struct tcphdr, check) */
        memcpy(p + 8, &v, 2);
        p += vlen;
    }
    if (f->family == 4) {
        p[0] = 0x45; /* version 4, IHL 5 */
        p[1] = 0;    /* TOS */
        put16(p + 2, total > MAX_IP_LEN ? 0 : (unsigned)total); /* BIG_IP_LEN_MAX */
        put16(p + 4, 0); /* ID 0 is fine with DF set: RFC 6864 §4.1 */
        put16(p + 6, IPV4_DF);
        p[8] = DEFAULT_TTL;
        p[9] = PROTO_TCP;
        put16(p + 10, 0);
        memcpy(p + 12, f->src, 4);
        memcpy(p + 16, f->dst, 4);
        put16(p + 10, inet_csum(p, 20, 0));
    } else {
        put32(p, (uint32_t)6 << 28); /* version 6, traffic class 0, flow label 0 */
        put16(p + 4, jumbo ? 0 : (unsigned)tcp_len);
        p[6] = jumbo ? 0 : PROTO_TCP; /* 0: Hop-by-Hop options follow */
        p[7] = DEFAULT_TTL;
        memcpy(p + 8, f->src, 16);
        memcpy(p + 24, f->dst, 16);
        if (jumbo) { /* the option at offset 2 of the header: 4n+2, as RFC 2675 §2 wants */
            p[40] = PROTO_TCP;
            p[41] = 0; /* 8 bytes in all */
            p[42] = IPV6_TLV_JUMBO;
            p[43] = 4;
            put32(p + 44, (uint32_t)(JUMBO_HBH_LEN + tcp_len));
        }
    }
    t = p + ip_hlen;
    put16(t, f->sport);
    put16(t + 2, f->dport);
    put32(t + 4, seq);
    put32(t + 8, f->ack);
    t[12] = (uint8_t)((thl / 4) << 4);
    t[13] = (uint8_t)flags;
    put16(t + 14, f->window);
    put16(t + 16, 0); /* checksum, filled below */
    put16(t + 18, 0); /* urgent pointer */
    if (optlen)
        memcpy(t + 20, opts, optlen);
    if (paylen && split == NULL)
        memcpy(t + thl, payload, paylen);
    if (vlen) /* partial: the folded pseudo-header sum, not complemented */
        put16(t + 16, fold16(f->pseudo + tcp_len));
    else
        put16(t + 16, inet_csum(t, tcp_len, f->pseudo + tcp_len));
    if (split != NULL) {
        PyObject *pair = PyTuple_Pack(2, pkt, split);
        Py_DECREF(pkt);
        return pair;
    }
    return pkt;
}

PyDoc_STRVAR(build_doc,
"build($module, /, family, src, dst, sport, dport, seq, ack, flags, window,\n"
"      payload=b'', mss=0, wscale=-1, sack_permitted=False, tsval=-1, tsecr=0,\n"
"      sack=(), gso_size=-1, split=False)\n--\n\n"
"One complete IP+TCP packet with correct checksums. Options: MSS 02 04 hi lo\n"
"(mss > 0), then 01 01 04 02 (sack_permitted), then 01 01 08 0a tsval tsecr\n"
"(tsval >= 0), then 01 01 05 len and the edges of sack (a tuple of up to four\n"
"(left, right) pairs of 32-bit values), then 01 03 03 shift (wscale >= 0); at most\n"
"40 bytes of options.\n"
"gso_size >= 0: prefix a virtio_net_hdr for an IFF_VNET_HDR TUN, leave the TCP\n"
"checksum partial (NEEDS_CSUM), and mark a payload longer than gso_size (> 0) as\n"
"TCP GSO with that segment size. A GSO packet may be up to BIG_IP_LEN_MAX bytes: over\n"
"the 16-bit length field its length is 0 (BIG TCP), and an IPv6 one then carries a\n"
"Hop-by-Hop Jumbo Payload option (RFC 2675). split (with gso_size >= 0 and a payload): return\n"
"(headers, payload) -- the payload object itself, uncopied -- for write_batch.");

static PyObject *fp_build(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    static const char *const names[] = {"family", "src", "dst", "sport", "dport",
                                        "seq", "ack", "flags", "window", "payload",
                                        "mss", "wscale", "sack_permitted", "tsval",
                                        "tsecr", "sack", "gso_size", "split"};
    PyObject *a[18], *res = NULL;
    build_args_t b;
    long long mss = 0, wscale = -1, tsval = -1, tsecr = 0, gso_size = -1;
    long long edges[2 * MAX_SACK_BLOCKS];
    Py_ssize_t nedges = 0, i;
    int sack = 0, split = 0;
    uint8_t opts[64]; /* every option at once would be 60 bytes; 40 are allowed */
    size_t optlen = 0, paylen;

    if (get_args("build", names, 18, 9, args, nargs, kwnames, a) < 0)
        return NULL;
    if (get_build_args(a, &b) < 0)
        goto done;
    if (a[10] != NULL && get_int(a[10], 0, 0xffff, "mss", &mss) < 0)
        goto done;
    /* RFC 7323 §2.3: a shift above 14 is never valid to send. */
    if (a[11] != NULL && get_int(a[11], -1, 14, "wscale", &wscale) < 0)
        goto done;
    if (a[12] != NULL && (sack = PyObject_IsTrue(a[12])) < 0)
        goto done;
    if (a[13] != NULL && get_int(a[13], -1, 0xffffffffLL, "tsval", &tsval) < 0)
        goto done;
    if (a[14] != NULL && get_int(a[14], 0, 0xffffffffLL, "tsecr", &tsecr) < 0)
        goto done;
    if (a[15] != NULL) {
        /* SACK blocks (RFC 2018 §3), validated like wire._sack_blocks. */
        if (!PyTuple_CheckExact(a[15])) {
            PyErr_Format(PyExc_TypeError, "sack must be a tuple, not %s", Py_TYPE(a[15])->tp_name);
            goto done;
        }
        nedges = PyTuple_GET_SIZE(a[15]);
        if (nedges % 2 || nedges > 2 * MAX_SACK_BLOCKS) {
            PyErr_SetString(PyExc_ValueError, "sack must hold 0 to 4 (left, right) pairs");
            goto done;
        }
        for (i = 0; i < nedges; i++)
            if (get_int(PyTuple_GET_ITEM(a[15], i), 0, 0xffffffffLL, "sack edge", &edges[i]) < 0)
                goto done;
    }
    if (a[16] != NULL && get_int(a[16], -1, 0xffff, "gso_size", &gso_size) < 0)
        goto done;
    if (a[17] != NULL && (split = PyObject_IsTrue(a[17])) < 0)
        goto done;
    if (mss > 0) {
        opts[optlen++] = 2;
        opts[optlen++] = 4;
        put16(opts + optlen, (unsigned)mss);
        optlen += 2;
    }
    if (sack) {
        opts[optlen++] = 1;
        opts[optlen++] = 1;
        opts[optlen++] = 4;
        opts[optlen++] = 2;
    }
    if (tsval >= 0) { /* RFC 7323 Appendix A layout: NOP NOP kind 8 */
        opts[optlen++] = 1;
        opts[optlen++] = 1;
        opts[optlen++] = 8;
        opts[optlen++] = 10;
        put32(opts + optlen, (uint32_t)tsval);
        put32(opts + optlen + 4, (uint32_t)tsecr);
        optlen += 8;
    }
    if (nedges) { /* NOP NOP kind 5 length, then the edges */
        opts[optlen++] = 1;
        opts[optlen++] = 1;
        opts[optlen++] = 5;
        opts[optlen++] = (uint8_t)(2 + 4 * nedges);
        for (i = 0; i < nedges; i++, optlen += 4)
            put32(opts + optlen, (uint32_t)edges[i]);
    }
    if (wscale >= 0) {
        opts[optlen++] = 1;
        opts[optlen++] = 3;
        opts[optlen++] = 3;
        opts[optlen++] = (uint8_t)wscale;
    }
    if (optlen > MAX_TCP_OPTIONS) {
        PyErr_SetString(PyExc_ValueError, "TCP options longer than 40 bytes");
        goto done;
    }
    paylen = b.have_payload ? (size_t)b.payload.len : 0;
    /* Only a GSO packet (for an IFF_VNET_HDR TUN, longer than one gso_size segment)
     * may pass the length field; the kernel cuts it or takes it whole. */
    if (paylen > (gso_size > 0 && paylen > (size_t)gso_size
                      ? BIG_IP_LEN_MAX - (b.f.family == 4 ? 20 : 40 + JUMBO_HBH_LEN)
                      : max_tcp_len(b.f.family)) - 20 - optlen) {
        PyErr_SetString(PyExc_ValueError, "payload too long for the IP length field");
        goto done;
    }
    res = emit(&b.f, b.seq, b.flags, opts, optlen,
               b.have_payload ? (const uint8_t *)b.payload.buf : NULL, paylen, (long)gso_size,
               split && gso_size >= 0 && paylen ? a[9] : NULL);
done:
    release_build_args(&b);
    return res;
}

PyDoc_STRVAR(build_many_doc,
"build_many($module, /, family, src, dst, sport, dport, seq, ack, flags, window,\n"
"           payload, mss)\n--\n\n"
"Split payload into ceil(len/mss) option-less segments (one if empty) with\n"
"consecutive sequence numbers; all but the last get flags without PSH and FIN.");

static PyObject *fp_build_many(PyObject *Py_UNUSED(mod), PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"family", "src", "dst", "sport", "dport", "seq",
                                        "ack", "flags", "window", "payload", "mss"};
    PyObject *a[11], *list = NULL;
    build_args_t b;
    long long mss;
    size_t total, seg, nseg, i, off;
    const uint8_t *data;
    unsigned mid_flags;

    if (get_args("build_many", names, 11, 11, args, nargs, kwnames, a) < 0)
        return NULL;
    if (get_build_args(a, &b) < 0)
        goto done;
    if (get_int(a[10], 1, 0xffff, "mss", &mss) < 0)
        goto done;
    total = (size_t)b.payload.len;
    data = (const uint8_t *)b.payload.buf;
    seg = total < (size_t)mss ? total : (size_t)mss;
    if (20 + seg > max_tcp_len(b.f.family)) {
        PyErr_SetString(PyExc_ValueError, "mss too large for the IP length field");
        goto done;
    }
    nseg = total == 0 ? 1 : (total + (size_t)mss - 1) / (size_t)mss;
    list = PyList_New((Py_ssize_t)nseg);
    if (list == NULL)
        goto done;
    /* PSH and FIN mark the end of the data (RFC 9293 §3.9.1), so only the last
     * segment carries them. */
    mid_flags = b.flags & ~(unsigned)(TH_PSH | TH_FIN);
    for (i = 0, off = 0; i < nseg; i++, off += (size_t)mss) {
        size_t len = total - off < (size_t)mss ? total - off : (size_t)mss;
        /* Sequence space wraps modulo 2**32 (RFC 9293 §3.4). */
        PyObject *pkt = emit(&b.f, b.seq + (uint32_t)off, i + 1 == nseg ? b.flags : mid_flags,
                             NULL, 0, len ? data + off : NULL, len, -1, NULL);
        if (pkt == NULL) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, pkt);
    }
done:
    release_build_args(&b);
    return list;
}

/* ------------------------------------------------------------------ batch I/O */

PyDoc_STRVAR(read_batch_doc,
"read_batch($module, /, fd, max_packets, bufsize)\n--\n\n"
"Read up to max_packets packets (one read() each) from a non-blocking fd until\n"
"EAGAIN or a 0-byte read. Other errors raise OSError unless packets were read.");

/* Packets up to this size are copied out of the reusable read buffer; larger ones are
 * read straight into the bytes object that is returned (shrunk in place), which saves
 * a 64 KiB memcpy per offloaded segment. */
#define READ_COPY_MAX 4096

static PyObject *fp_read_batch(PyObject *Py_UNUSED(mod), PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"fd", "max_packets", "bufsize"};
    PyObject *a[3], *list, *buf = NULL;
    long long fd, max_packets, bufsize;
    int err = 0;

    if (get_args("read_batch", names, 3, 3, args, nargs, kwnames, a) < 0)
        return NULL;
    if (get_int(a[0], 0, INT_MAX, "fd", &fd) < 0 ||
        get_int(a[1], 1, INT_MAX, "max_packets", &max_packets) < 0 ||
        get_int(a[2], 1, INT_MAX, "bufsize", &bufsize) < 0)
        return NULL;
    /* Both factors are < 2**31, so the product cannot overflow a long long. */
    if (max_packets * bufsize > READ_BATCH_MAX_BYTES) {
        PyErr_SetString(PyExc_ValueError, "max_packets * bufsize exceeds READ_BATCH_MAX_BYTES");
        return NULL;
    }
    list = PyList_New(0);
    if (list == NULL)
        return NULL;
    while (PyList_GET_SIZE(list) < max_packets) {
        ssize_t r;
        PyObject *pkt;

        if (buf == NULL && (buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bufsize)) == NULL)
            goto fail;
        Py_BEGIN_ALLOW_THREADS
        do {
            /* EINTR: retry (PEP 475). The fd is non-blocking, so this never waits
             * long enough for a delayed signal handler to matter. */
            r = read((int)fd, PyBytes_AS_STRING(buf), (size_t)bufsize);
        } while (r < 0 && errno == EINTR);
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            err = errno;
        Py_END_ALLOW_THREADS
        if (r <= 0) /* EAGAIN, an error, or EOF (a TUN never says it: no empty packets) */
            break;
        /* read() on a TUN clamps an oversized packet to the buffer (the truncated rest
         * fails parse); a longer result would be a bug elsewhere: never hand it over. */
        if (r > bufsize)
            continue;
        if (r <= READ_COPY_MAX) {
            pkt = PyBytes_FromStringAndSize(PyBytes_AS_STRING(buf), r);
            if (pkt == NULL)
                goto fail;
        } else {
            if (_PyBytes_Resize(&buf, r) < 0) /* frees buf and sets it NULL on failure */
                goto fail;
            pkt = buf;
            buf = NULL;
        }
        if (PyList_Append(list, pkt) < 0) {
            Py_DECREF(pkt);
            goto fail;
        }
        Py_DECREF(pkt);
    }
    Py_XDECREF(buf);
    if (PyList_GET_SIZE(list) == 0 && err != 0) {
        /* Packets already read take priority; the next call will meet the error. */
        Py_DECREF(list);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return list;
fail:
    Py_XDECREF(buf);
    Py_DECREF(list);
    return NULL;
}

PyDoc_STRVAR(write_batch_doc,
"write_batch($module, /, fd, packets)\n--\n\n"
"Write each packet with one write() -- or one writev() for a tuple of buffers, the\n"
"parts of one packet (build(split=True)); return how many were written. EAGAIN and\n"
"ENOBUFS end the batch early; other errors raise OSError with .packets_written.");

/* Parts of one gathered packet: headers + payload, with room to spare. */
#define WRITE_MAX_PARTS 4

static PyObject *fp_write_batch(PyObject *Py_UNUSED(mod), PyObject *const *args,
                                Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"fd", "packets"};
    PyObject *a[2], *seq;
    long long fd;
    Py_buffer *bufs = NULL;
    Py_ssize_t *first = NULL; /* packet i is bufs[first[i] .. first[i + 1]) */
    Py_ssize_t n, i, nbufs = 0, got = 0, written = 0;
    int err = 0;

    if (get_args("write_batch", names, 2, 2, args, nargs, kwnames, a) < 0)
        return NULL;
    if (get_int(a[0], 0, INT_MAX, "fd", &fd) < 0)
        return NULL;
    seq = PySequence_Fast(a[1], "packets must be iterable");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t parts = PyTuple_CheckExact(item) ? PyTuple_GET_SIZE(item) : 1;
        if (parts < 1 || parts > WRITE_MAX_PARTS) {
            PyErr_Format(PyExc_ValueError, "a packet has 1..%d parts, got %zd",
                         WRITE_MAX_PARTS, parts);
            Py_DECREF(seq);
            return NULL;
        }
        nbufs += parts;
    }
    /* Gather every buffer before releasing the GIL: the exports pin the memory (a
     * bytearray cannot resize while exported) for the duration of the writes. */
    bufs = PyMem_Malloc((size_t)(nbufs > 0 ? nbufs : 1) * sizeof(*bufs));
    first = PyMem_Malloc((size_t)(n + 1) * sizeof(*first));
    if (bufs == NULL || first == NULL) {
        PyMem_Free(bufs);
        PyMem_Free(first);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        first[i] = got;
        if (!PyTuple_CheckExact(item)) {
            if (PyObject_GetBuffer(item, &bufs[got], PyBUF_SIMPLE) < 0)
                goto release;
            got++;
            continue;
        }
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(item); k++) {
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, k), &bufs[got], PyBUF_SIMPLE) < 0)
                goto release;
            got++;
        }
    }
    first[n] = got;

    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n;) {
        /* TUN and datagram sockets take a packet whole or not at all, so any
         * non-negative return is one packet written. */
        Py_ssize_t lo = first[i], parts = first[i + 1] - lo;
        ssize_t r;
        if (parts == 1) {
            r = write((int)fd, bufs[lo].buf, (size_t)bufs[lo].len);
        } else {
            struct iovec iov[WRITE_MAX_PARTS];
            for (Py_ssize_t k = 0; k < parts; k++) {
                iov[k].iov_base = bufs[lo + k].buf;
                iov[k].iov_len = (size_t)bufs[lo + k].len;
            }
            r = writev((int)fd, iov, (int)parts);
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* A full queue is back-pressure, not failure: report the short count. */
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS)
                err = errno;
            break;
        }
        i++;
    }
    written = i;
    Py_END_ALLOW_THREADS

    if (err != 0) {
        /* OSError(errno, strerror) picks the matching subclass, like os.write does. */
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
        if (exc != NULL) {
            PyObject *cnt = PyLong_FromSsize_t(written);
            if (cnt != NULL && PyObject_SetAttrString(exc, "packets_written", cnt) == 0)
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_XDECREF(cnt);
            Py_DECREF(exc);
        }
    }
release:
    for (i = 0; i < got; i++)
        PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(first);
    Py_DECREF(seq);
    if (got < nbufs || err != 0)
        return NULL;
    return PyLong_FromSsize_t(written);
}

/* ------------------------------------------------------------------ module */

#define FASTCALL(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef fp_methods[] = {
    {"checksum", FASTCALL(fp_checksum), METH_FASTCALL | METH_KEYWORDS, checksum_doc},
    {"parse", FASTCALL(fp_parse), METH_FASTCALL | METH_KEYWORDS, parse_doc},
    {"build", FASTCALL(fp_build), METH_FASTCALL | METH_KEYWORDS, build_doc},
    {"build_many", FASTCALL(fp_build_many), METH_FASTCALL | METH_KEYWORDS, build_many_doc},
    {"read_batch", FASTCALL(fp_read_batch), METH_FASTCALL | METH_KEYWORDS, read_batch_doc},
    {"write_batch", FASTCALL(fp_write_batch), METH_FASTCALL | METH_KEYWORDS, write_batch_doc},
    {NULL, NULL, 0, NULL},
};

static int fp_exec(PyObject *m)
{
    static const struct {
        const char *name;
        long value;
    } consts[] = {
        {"FIN", TH_FIN},
        {"SYN", TH_SYN},
        {"RST", TH_RST},
        {"PSH", TH_PSH},
        {"ACK", TH_ACK},
        {"URG", TH_URG},
        {"ECE", TH_ECE},
        {"CWR", TH_CWR},
        {"DROP_TRUNCATED", DROP_TRUNCATED},
        {"DROP_BAD_VERSION", DROP_BAD_VERSION},
        {"DROP_BAD_IP_HEADER", DROP_BAD_IP_HEADER},
        {"DROP_FRAGMENT", DROP_FRAGMENT},
        {"DROP_NOT_TCP", DROP_NOT_TCP},
        {"DROP_BAD_IP_CHECKSUM", DROP_BAD_IP_CHECKSUM},
        {"DROP_BAD_TCP_HEADER", DROP_BAD_TCP_HEADER},
        {"DROP_BAD_TCP_CHECKSUM", DROP_BAD_TCP_CHECKSUM},
        {"DROP_BAD_OPTIONS", DROP_BAD_OPTIONS},
        {"DROP_BAD_ADDRESS", DROP_BAD_ADDRESS},
        {"READ_BATCH_MAX_BYTES", (long)READ_BATCH_MAX_BYTES},
        {"VNET_HDR_LEN", VNET_HDR_LEN},
        {"BIG_IP_LEN_MAX", (long)BIG_IP_LEN_MAX},
    };
    PyObject *reasons;
    size_t i;
    int rc;

    for (i = 0; i < sizeof(consts) / sizeof(consts[0]); i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            return -1;
    reasons = PyTuple_New(DROP_COUNT);
    if (reasons == NULL)
        return -1;
    for (i = 0; i < DROP_COUNT; i++) {
        PyObject *s = PyUnicode_InternFromString(drop_names[i]);
        if (s == NULL) {
            Py_DECREF(reasons);
            return -1;
        }
        PyTuple_SET_ITEM(reasons, (Py_ssize_t)i, s);
    }
    rc = PyModule_AddObjectRef(m, "DROP_REASONS", reasons);
    Py_DECREF(reasons);
    return rc;
}

static PyModuleDef_Slot fp_slots[] = {
    {Py_mod_exec, (void *)fp_exec},
    {0, NULL},
};

static struct PyModuleDef fp_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxyvpn._fastpath",
    .m_doc = "Per-packet fast path (parse, checksum, build, batch I/O); twin of "
             "proxyvpn.netstack.wire.",
    .m_size = 0,
    .m_methods = fp_methods,
    .m_slots = fp_slots,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModuleDef_Init(&fp_module); }
