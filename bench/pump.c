/* pump: the benchmark's traffic programs, in C so they are never the bottleneck.
 *
 * Built by bench/pump.py into a temporary directory at the start of every run.
 *
 *   pump serve  --port P
 *   pump down   --host H --port P [--proxy IP:PORT] --bytes N --conns K
 *   pump up     --host H --port P [--proxy IP:PORT] --bytes N --conns K
 *   pump rr     --host H --port P [--proxy IP:PORT] --conns K --seconds S --req B --resp B
 *   pump lat    --host H --port P [--proxy IP:PORT] --count N --size B
 *   pump idle   --host H --port P [--proxy IP:PORT] --conns N [--parallel T]
 *                                       [--conn-timeout S]  (default 15 s per flow)
 *
 * With --proxy the client speaks HTTP CONNECT to the proxy itself (the direct-CONNECT
 * mode); without it, it connects to H:P and whatever captures the connection (proxyvpn,
 * redsocks) does the CONNECT. Every client prints one JSON line on stdout.
 *
 * Wire protocol: the client sends a 24-byte header {u32 magic, u32 op, u64 a, u64 b}
 * (network order), then:
 *   DOWN  a=bytes        server sends a bytes; both wait for the client's close.
 *   UP    a=bytes        client sends a bytes; server answers 8 bytes once all arrived.
 *   ECHO  a=size         server echoes every a-byte message until EOF.
 *   RR    a=req b=resp   server reads a more bytes, sends b bytes, closes first.
 *   IDLE                 server answers 1 byte, then holds the connection until EOF.
 * No direction is ever half-closed: many proxies drop a CONNECT tunnel on half-close.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x50554d50u /* "PUMP" */
enum { OP_DOWN = 1, OP_UP = 2, OP_ECHO = 3, OP_RR = 4, OP_IDLE = 5 };
#define HDR 24
#define BUF (1 << 20)

static const char *opt_host = "127.0.0.1", *opt_proxy = NULL;
static int opt_port = 9000, opt_conns = 1, opt_parallel = 32, opt_timeout = 600;
static int opt_conn_timeout = 0; /* idle: seconds to connect and get the server's ack */
static long long opt_bytes = 1 << 20, opt_count = 1000;
static double opt_seconds = 5;
static int opt_req = 100, opt_resp = 100, opt_size = 100;
static char *sendbuf;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static void die(const char *what) {
    printf("{\"ok\": false, \"error\": \"%s: %s\"}\n", what, strerror(errno));
    fflush(stdout);
    _exit(2);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "{\"ok\": false, \"error\": \"timeout\"}\n";
    if (write(1, msg, sizeof msg - 1) < 0) {}
    _exit(3);
}

static uint64_t hton64(uint64_t v) { return ((uint64_t)htonl(v & 0xffffffffu) << 32) | htonl(v >> 32); }

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n) {
    char *c = p;
    while (n) {
        ssize_t r = recv(fd, c, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Read and discard n bytes without copying them (MSG_TRUNC on TCP drops the data). */
static long long discard(int fd, long long n) {
    long long got = 0;
    while (got < n) {
        size_t want = n - got > BUF ? BUF : (size_t)(n - got);
        ssize_t r = recv(fd, NULL, want, MSG_TRUNC);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += r;
    }
    return got;
}

static int send_bytes(int fd, long long n) {
    while (n > 0) {
        size_t chunk = n > BUF ? BUF : (size_t)n;
        ssize_t w = send(fd, sendbuf, chunk, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        n -= w;
    }
    return 0;
}

static void drain_to_eof(int fd) {
    while (1) {
        ssize_t r = recv(fd, NULL, BUF, MSG_TRUNC);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return;
    }
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ------------------------------------------------------------------ server */

static int idle_ep;

static void *idle_loop(void *arg) {
    (void)arg;
    struct epoll_event evs[256];
    char buf[4096];
    while (1) {
        int n = epoll_wait(idle_ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                epoll_ctl(idle_ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
    return NULL;
}

static void *serve_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    unsigned char h[HDR];
    if (read_all(fd, h, HDR) < 0) goto out;
    uint32_t magic, op;
    uint64_t a, b;
    memcpy(&magic, h, 4);
    memcpy(&op, h + 4, 4);
    memcpy(&a, h + 8, 8);
    memcpy(&b, h + 16, 8);
    if (ntohl(magic) != MAGIC) goto out;
    op = ntohl(op);
    a = hton64(a);
    b = hton64(b);
    switch (op) {
    case OP_DOWN:
        if (send_bytes(fd, (long long)a) == 0) drain_to_eof(fd);
        break;
    case OP_UP: {
        double t0 = now();
        long long got = discard(fd, (long long)a);
        if (got == (long long)a) {
            uint64_t ns = hton64((uint64_t)((now() - t0) * 1e9));
            if (write_all(fd, &ns, 8) == 0) drain_to_eof(fd);
        }
        break;
    }
    case OP_ECHO: {
        nodelay(fd);
        char *buf = malloc(a ? a : 1);
        while (read_all(fd, buf, a) == 0 && write_all(fd, buf, a) == 0) {}
        free(buf);
        break;
    }
    case OP_RR: {
        nodelay(fd);
        char *buf = malloc(a + b + 1);
        memset(buf, 'r', a + b + 1);
        if (read_all(fd, buf, a) == 0) write_all(fd, buf, b);
        free(buf);
        break; /* close first: the client reads the reply, then our EOF */
    }
    case OP_IDLE: {
        char k = 'k';
        if (write_all(fd, &k, 1) < 0) break;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        if (epoll_ctl(idle_ep, EPOLL_CTL_ADD, fd, &ev) == 0) return NULL;
        break;
    }
    }
out:
    close(fd);
    return NULL;
}

static int serve(void) {
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    int one = 1, zero = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 addr = {.sin6_family = AF_INET6, .sin6_port = htons(opt_port),
                                .sin6_addr = IN6ADDR_ANY_INIT};
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(s, 4096) < 0) die("listen");
    idle_ep = epoll_create1(0);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    pthread_create(&t, &attr, idle_loop, NULL);
    printf("{\"ok\": true, \"listening\": %d}\n", opt_port);
    fflush(stdout);
    for (;;) {
        int fd = accept(s, NULL, NULL);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) usleep(10000);
            continue;
        }
        if (pthread_create(&t, &attr, serve_conn, (void *)(intptr_t)fd) != 0) close(fd);
    }
    return 0;
}

/* ------------------------------------------------------------------ client */

static struct sockaddr_storage target;
static socklen_t target_len;

/* target = ip (IPv4 or IPv6, no brackets) and port; 0 if ip is neither. */
static int set_target(const char *ip, int port) {
    struct sockaddr_in *v4 = (struct sockaddr_in *)&target;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&target;
    memset(&target, 0, sizeof target);
    if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        target_len = sizeof *v4;
        return 1;
    }
    if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        target_len = sizeof *v6;
        return 1;
    }
    return 0;
}

/* A connected socket to the server, through the proxy's CONNECT when --proxy is given. */
static int dial(void) {
    int fd = socket(target.ss_family, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (opt_conn_timeout > 0) {
        /* SO_SNDTIMEO bounds connect() too; SO_RCVTIMEO bounds every later read. */
        struct timeval tv = {.tv_sec = opt_conn_timeout};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
    if (connect(fd, (struct sockaddr *)&target, target_len) < 0) {
        close(fd);
        return -1;
    }
    if (!opt_proxy) return fd;
    char req[256], resp[1024];
    const char *lb = strchr(opt_host, ':') ? "[" : "", *rb = *lb ? "]" : "";
    int n = snprintf(req, sizeof req, "CONNECT %s%s%s:%d HTTP/1.1\r\nHost: %s%s%s:%d\r\n\r\n",
                     lb, opt_host, rb, opt_port, lb, opt_host, rb, opt_port);
    if (write_all(fd, req, (size_t)n) < 0) goto fail;
    /* The server never speaks first, so reading past the header block cannot happen. */
    size_t got = 0;
    while (got < sizeof resp - 1) {
        ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) goto fail;
        got += (size_t)r;
        resp[got] = 0;
        if (strstr(resp, "\r\n\r\n")) break;
    }
    if (strncmp(resp, "HTTP/1.", 7) != 0 || strncmp(resp + 9, "200", 3) != 0) {
        errno = ECONNREFUSED;
        goto fail;
    }
    return fd;
fail:
    close(fd);
    return -1;
}

static void header(unsigned char *h, uint32_t op, uint64_t a, uint64_t b) {
    uint32_t m = htonl(MAGIC), o = htonl(op);
    a = hton64(a);
    b = hton64(b);
    memcpy(h, &m, 4);
    memcpy(h + 4, &o, 4);
    memcpy(h + 8, &a, 8);
    memcpy(h + 16, &b, 8);
}

/* ---- bulk: K connections set up first, then timed together from one barrier */

struct bulk {
    int fd, ok;
    double end;
    long long bytes;
};
static pthread_barrier_t barrier;
static double bulk_t0;
static int bulk_op;

static void *bulk_thread(void *arg) {
    struct bulk *b = arg;
    pthread_barrier_wait(&barrier);
    unsigned char h[HDR];
    header(h, bulk_op, (uint64_t)opt_bytes, 0);
    if (write_all(b->fd, h, HDR) < 0) goto done;
    if (bulk_op == OP_DOWN) {
        b->bytes = discard(b->fd, opt_bytes);
        b->ok = b->bytes == opt_bytes;
    } else {
        uint64_t ns;
        if (send_bytes(b->fd, opt_bytes) == 0 && read_all(b->fd, &ns, 8) == 0) {
            b->bytes = opt_bytes;
            b->ok = 1;
        }
    }
done:
    b->end = now();
    return NULL;
}

static int bulk(int op) {
    bulk_op = op;
    struct bulk *bs = calloc((size_t)opt_conns, sizeof *bs);
    pthread_t *ts = calloc((size_t)opt_conns, sizeof *ts);
    for (int i = 0; i < opt_conns; i++) {
        bs[i].fd = dial();
        if (bs[i].fd < 0) die("connect");
    }
    pthread_barrier_init(&barrier, NULL, (unsigned)opt_conns + 1);
    for (int i = 0; i < opt_conns; i++) pthread_create(&ts[i], NULL, bulk_thread, &bs[i]);
    double cpu0 = cpu_self();
    bulk_t0 = now();
    pthread_barrier_wait(&barrier);
    double end = bulk_t0, first = 1e300;
    long long total = 0;
    int ok = 1;
    for (int i = 0; i < opt_conns; i++) {
        pthread_join(ts[i], NULL);
        if (bs[i].end > end) end = bs[i].end;
        if (bs[i].end < first) first = bs[i].end;
        total += bs[i].bytes;
        ok &= bs[i].ok;
    }
    double cpu = cpu_self() - cpu0;
    for (int i = 0; i < opt_conns; i++) close(bs[i].fd);
    double secs = end - bulk_t0;
    printf("{\"ok\": %s, \"bytes\": %lld, \"seconds\": %.6f, \"bytes_per_s\": %.1f, "
           "\"first_done_s\": %.6f, \"client_cpu_s\": %.4f}\n",
           ok ? "true" : "false", total, secs, total / secs, first - bulk_t0, cpu);
    return ok ? 0 : 1;
}

/* ---- rr: connect, request, reply, close, as fast as K concurrent clients can */

struct rr {
    long long done, errors;
    double *lat;
    long long cap;
};
static double rr_deadline;
static char rr_err[160];

static void note_error(const char *what) {
    if (!rr_err[0]) snprintf(rr_err, sizeof rr_err, "%s: %s", what, strerror(errno));
}

static void *rr_thread(void *arg) {
    struct rr *r = arg;
    unsigned char *req = calloc(1, (size_t)opt_req + HDR);
    char *resp = malloc((size_t)opt_resp);
    header(req, OP_RR, (uint64_t)(opt_req - HDR), (uint64_t)opt_resp);
    while (now() < rr_deadline) {
        double t0 = now();
        int fd = dial();
        if (fd < 0) {
            note_error("connect");
            r->errors++;
            usleep(1000);
            continue;
        }
        nodelay(fd);
        int ok = write_all(fd, req, (size_t)opt_req) == 0 && read_all(fd, resp, (size_t)opt_resp) == 0;
        if (ok) {
            char c;
            ssize_t x;
            while ((x = recv(fd, &c, 1, 0)) < 0 && errno == EINTR) {}
            ok = x == 0;
        }
        if (!ok) note_error("exchange");
        close(fd);
        if (!ok) {
            r->errors++;
            continue;
        }
        if (r->done < r->cap) r->lat[r->done] = now() - t0;
        r->done++;
    }
    free(req);
    free(resp);
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long long n, double p) {
    if (n == 0) return 0;
    long long i = (long long)(p * (double)(n - 1) + 0.5);
    return v[i];
}

static int rr(void) {
    if (opt_req < HDR) opt_req = HDR;
    struct rr *rs = calloc((size_t)opt_conns, sizeof *rs);
    pthread_t *ts = calloc((size_t)opt_conns, sizeof *ts);
    double cpu0 = cpu_self();
    double t0 = now();
    rr_deadline = t0 + opt_seconds;
    for (int i = 0; i < opt_conns; i++) {
        rs[i].cap = 1 << 17;
        rs[i].lat = malloc(sizeof(double) * (size_t)rs[i].cap);
        pthread_create(&ts[i], NULL, rr_thread, &rs[i]);
    }
    long long done = 0, errors = 0, kept = 0;
    for (int i = 0; i < opt_conns; i++) {
        pthread_join(ts[i], NULL);
        done += rs[i].done;
        errors += rs[i].errors;
    }
    double secs = now() - t0, cpu = cpu_self() - cpu0;
    double *all = malloc(sizeof(double) * (size_t)(done + 1));
    for (int i = 0; i < opt_conns; i++)
        for (long long j = 0; j < rs[i].done && j < rs[i].cap; j++) all[kept++] = rs[i].lat[j];
    qsort(all, (size_t)kept, sizeof *all, cmp_double);
    printf("{\"ok\": %s, \"conns\": %lld, \"errors\": %lld, \"seconds\": %.6f, "
           "\"conns_per_s\": %.1f, \"conn_p50_us\": %.1f, \"conn_p99_us\": %.1f, "
           "\"client_cpu_s\": %.4f, \"first_error\": \"%s\"}\n",
           done > 0 ? "true" : "false", done, errors, secs, done / secs,
           pct(all, kept, 0.5) * 1e6, pct(all, kept, 0.99) * 1e6, cpu, rr_err);
    return done > 0 ? 0 : 1;
}

/* ---- lat: ping-pong over one established connection */

static int lat(void) {
    int fd = dial();
    if (fd < 0) die("connect");
    nodelay(fd);
    unsigned char h[HDR];
    header(h, OP_ECHO, (uint64_t)opt_size, 0);
    if (write_all(fd, h, HDR) < 0) die("send");
    char *buf = calloc(1, (size_t)opt_size);
    long long warm = opt_count / 10 + 10;
    double *v = malloc(sizeof(double) * (size_t)opt_count);
    double t_start = now();
    for (long long i = -warm; i < opt_count; i++) {
        double t0 = now();
        if (write_all(fd, buf, (size_t)opt_size) < 0 || read_all(fd, buf, (size_t)opt_size) < 0)
            die("echo");
        if (i >= 0) v[i] = now() - t0;
    }
    double secs = now() - t_start;
    close(fd);
    double sum = 0;
    for (long long i = 0; i < opt_count; i++) sum += v[i];
    qsort(v, (size_t)opt_count, sizeof *v, cmp_double);
    printf("{\"ok\": true, \"count\": %lld, \"seconds\": %.4f, \"p50_us\": %.1f, "
           "\"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"mean_us\": %.1f, "
           "\"min_us\": %.1f, \"max_us\": %.1f}\n",
           opt_count, secs, pct(v, opt_count, 0.5) * 1e6, pct(v, opt_count, 0.9) * 1e6,
           pct(v, opt_count, 0.99) * 1e6, pct(v, opt_count, 0.999) * 1e6,
           sum / opt_count * 1e6, v[0] * 1e6, v[opt_count - 1] * 1e6);
    return 0;
}

/* ---- idle: open N connections, report, hold them until stdin closes */

static int *idle_fds;
static long long idle_next, idle_failed;
static pthread_mutex_t idle_mu = PTHREAD_MUTEX_INITIALIZER;

static void *idle_thread(void *arg) {
    (void)arg;
    unsigned char h[HDR];
    header(h, OP_IDLE, 0, 0);
    while (1) {
        pthread_mutex_lock(&idle_mu);
        long long i = idle_next < opt_conns ? idle_next++ : -1;
        pthread_mutex_unlock(&idle_mu);
        if (i < 0) return NULL;
        int fd = dial();
        char k;
        if (fd < 0) note_error("connect");
        if (fd >= 0 && (write_all(fd, h, HDR) < 0 || read_all(fd, &k, 1) < 0)) {
            note_error("exchange");
            close(fd);
            fd = -1;
        }
        idle_fds[i] = fd;
        if (fd < 0) __sync_fetch_and_add(&idle_failed, 1);
    }
}

static int idle(void) {
    if (!opt_conn_timeout) opt_conn_timeout = 15;
    idle_fds = calloc((size_t)opt_conns, sizeof *idle_fds);
    pthread_t *ts = calloc((size_t)opt_parallel, sizeof *ts);
    double t0 = now();
    for (int i = 0; i < opt_parallel; i++) pthread_create(&ts[i], NULL, idle_thread, NULL);
    for (int i = 0; i < opt_parallel; i++) pthread_join(ts[i], NULL);
    double secs = now() - t0;
    printf("{\"ok\": %s, \"opened\": %lld, \"failed\": %lld, \"seconds\": %.3f, "
           "\"first_error\": \"%s\"}\n",
           idle_failed ? "false" : "true", opt_conns - idle_failed, idle_failed, secs, rr_err);
    fflush(stdout);
    alarm(0);
    char c;
    while (read(0, &c, 1) > 0) {}
    for (int i = 0; i < opt_conns; i++)
        if (idle_fds[i] >= 0) close(idle_fds[i]);
    return 0;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: pump serve|down|up|rr|lat|idle [options]\n");
        return 64;
    }
    const char *cmd = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) opt_host = v;
        else if (!strcmp(k, "--port")) opt_port = atoi(v);
        else if (!strcmp(k, "--proxy")) opt_proxy = v;
        else if (!strcmp(k, "--bytes")) opt_bytes = atoll(v);
        else if (!strcmp(k, "--conns")) opt_conns = atoi(v);
        else if (!strcmp(k, "--parallel")) opt_parallel = atoi(v);
        else if (!strcmp(k, "--seconds")) opt_seconds = atof(v);
        else if (!strcmp(k, "--count")) opt_count = atoll(v);
        else if (!strcmp(k, "--size")) opt_size = atoi(v);
        else if (!strcmp(k, "--req")) opt_req = atoi(v);
        else if (!strcmp(k, "--resp")) opt_resp = atoi(v);
        else if (!strcmp(k, "--timeout")) opt_timeout = atoi(v);
        else if (!strcmp(k, "--conn-timeout")) opt_conn_timeout = atoi(v);
        else {
            fprintf(stderr, "unknown option %s\n", k);
            return 64;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    sendbuf = malloc(BUF);
    for (int i = 0; i < BUF; i++) sendbuf[i] = (char)(i * 7 + 13);
    if (!strcmp(cmd, "serve")) return serve();

    signal(SIGALRM, on_alarm);
    alarm((unsigned)opt_timeout);
    if (opt_proxy) {
        char ip[64];
        snprintf(ip, sizeof ip, "%s", opt_proxy);
        char *colon = strrchr(ip, ':');
        if (!colon) die("--proxy IP:PORT");
        *colon = 0;
        if (!set_target(ip, atoi(colon + 1))) die("--proxy IP");
    } else if (!set_target(opt_host, opt_port)) {
        die("--host IP");
    }
    if (opt_parallel > opt_conns) opt_parallel = opt_conns;
    if (!strcmp(cmd, "down")) return bulk(OP_DOWN);
    if (!strcmp(cmd, "up")) return bulk(OP_UP);
    if (!strcmp(cmd, "rr")) return rr();
    if (!strcmp(cmd, "lat")) return lat();
    if (!strcmp(cmd, "idle")) return idle();
    fprintf(stderr, "unknown command %s\n", cmd);
    return 64;
}
