/*
 * proxyvpn launcher: the one privileged file of proxyvpn.
 *
 * install.sh compiles this file into INSTALL_DIR/proxyvpn (default /usr/local/bin),
 * mode 0750 root:proxyvpn, file capability cap_net_admin=eip. It starts the Python
 * program installed in a root-owned virtual environment:
 *
 *     PROXYVPN_PYTHON -I -B -m proxyvpn ARGS...
 *
 * -I (isolated mode) implies -E (ignore every PYTHON* variable), -s (no user site
 * directory) and -P (no script/current directory on sys.path); -B writes no .pyc files
 * into the root-owned tree. The interpreter and package paths are compiled in
 * (-DPROXYVPN_PYTHON=... from install.sh); nothing the caller controls selects code.
 *
 * Before exec, in this order:
 *
 *  1. fds 0-2 are made valid (opened on /dev/null when closed); other fds get FD_CLOEXEC.
 *  2. Real, effective and saved ids must agree (the launcher is never set-user-ID).
 *  3. Trust: the interpreter (its symlink and its target), the standard library, the
 *     venv and the package directory, and each of their ancestors up to /, must be owned
 *     by root and writable by nobody but root (group write is tolerated for gid 0; an
 *     ancestor may be world-writable only with the sticky bit, like /tmp, because then
 *     nobody can rename or replace the root-owned entry inside it). Every file in the
 *     venv is checked the same way (without the sticky exception). Any failure: one
 *     clear line on stderr, exit 1, nothing executed.
 *  4. Group: a caller that is neither root nor a member of the launcher's group (the
 *     group owning this file) is refused with a message. The kernel already refuses
 *     such callers while the file is mode 0750; this catches a file chmod'ed to 0755.
 *  5. Capabilities (non-root caller): effective = permitted = inheritable =
 *     {CAP_NET_ADMIN} (or all empty when the file capability is missing, so that
 *     `--help`, `status` and `--dry-run` still work and `up` explains what is missing),
 *     ambient = {CAP_NET_ADMIN}, then PR_SET_NO_NEW_PRIVS.
 *  6. Environment: rebuilt from nothing (see build_env()).
 *
 * `proxyvpn exec ...` (argv[1] is "exec") differs in 5 and 6: every capability is
 * dropped instead, and the caller's environment is kept for the command it runs.
 *
 * Why ambient, and the execve(2) arithmetic (capabilities(7)); F = file caps:
 *     pA' = (file has caps or is set-id) ? 0 : pA
 *     pP' = (pI & fI) | (fP & bounding) | pA'
 *     pE' = fE ? pP' : pA'
 * The interpreter carries no file capabilities, so without an ambient capability it
 * would start with nothing. Raising CAP_NET_ADMIN into pI and pA (allowed: it is in pP)
 * makes pP' = pE' = pA' = {CAP_NET_ADMIN} for python and for the nft/iptables/ip
 * children it may run; no other capability can reach them.
 *
 * PR_SET_NO_NEW_PRIVS, thought through: set by a *parent* it would stop this file's
 * capability from being granted (the kernel caps pP' at the parent's pP). Set *here*,
 * after raising the ambient capability, it costs nothing: ambient capabilities are not
 * new privileges (pP' is a subset of pP), so python keeps CAP_NET_ADMIN, while no later
 * execve by proxyvpn or its children (a set-user-ID sudo, a file-capability binary)
 * can gain anything. It also stands in for the bounding set, which an unprivileged
 * process cannot shrink (PR_CAPBSET_DROP needs CAP_SETPCAP). A service manager that
 * sets NoNewPrivileges= must therefore hand CAP_NET_ADMIN over itself
 * (AmbientCapabilities=), as packaging/systemd/proxyvpn.service does.
 *
 * Root (real uid 0, e.g. `sudo proxyvpn`): capabilities are left alone. Confining root
 * to CAP_NET_ADMIN here would break `proxyvpn demo` (namespaces need CAP_SYS_ADMIN)
 * and `sudo proxyvpn down --state-dir <a user's dir>` (CAP_DAC_OVERRIDE); `proxyvpn up`
 * confines itself (proxyvpn.privileges.drop_to_net_admin(): bounding set included,
 * which root can shrink). The environment is scrubbed and the tree checked all the same.
 *
 * Build: cc -O2 -Wall -Wextra -o proxyvpn launcher.c (no library: raw capget/capset).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <linux/capability.h>

#ifndef PROXYVPN_PREFIX
#define PROXYVPN_PREFIX "/usr/local/lib/proxyvpn"
#endif
#ifndef PROXYVPN_VENV
#define PROXYVPN_VENV PROXYVPN_PREFIX "/venv"
#endif
#ifndef PROXYVPN_PYTHON
#define PROXYVPN_PYTHON PROXYVPN_VENV "/bin/python3"
#endif
#ifndef PROXYVPN_PACKAGE
#error "PROXYVPN_PACKAGE (the installed proxyvpn package directory) must be defined"
#endif
#ifndef PROXYVPN_STDLIB
#error "PROXYVPN_STDLIB (the interpreter's standard library directory) must be defined"
#endif
#ifndef PROXYVPN_LAUNCHER
#define PROXYVPN_LAUNCHER "/usr/local/bin/proxyvpn"
#endif
#ifndef PROXYVPN_GROUP
#define PROXYVPN_GROUP "proxyvpn"
#endif

#define SAFE_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_IS_SET 1
#define PR_CAP_AMBIENT_RAISE 2
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#ifndef PR_SET_NO_NEW_PRIVS
#define PR_SET_NO_NEW_PRIVS 38
#endif

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void die(const char *fmt, ...)
{
    va_list ap;
    fputs("proxyvpn: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* ------------------------------------------------------------------ file descriptors */

static void sane_fds(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
            int null = open("/dev/null", O_RDWR);
            if (null != fd)
                _exit(1); /* cannot even report: stderr may be the one missing */
        }
    }
#ifdef SYS_close_range
    /* CLOSE_RANGE_CLOEXEC (Linux 5.11): inherited fds do not reach python. */
    if (syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */) == 0)
        return;
#endif
    long max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536)
        max = 65536;
    for (int fd = 3; fd < max; fd++) {
        int flags = fcntl(fd, F_GETFD);
        if (flags != -1)
            fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    }
}

/* ------------------------------------------------------------------ trust checks */

/* Why `st` (at `path`) may not be trusted, or NULL. `ancestor`: a directory on the way
 * up to /, where a root-owned sticky directory (like /tmp) is acceptable. */
static const char *untrusted(const struct stat *st, int ancestor)
{
    static char why[96];
    if (st->st_uid != 0) {
        snprintf(why, sizeof why, "is owned by uid %u, not by root", (unsigned)st->st_uid);
        return why;
    }
    if (S_ISLNK(st->st_mode))
        return NULL; /* a symlink's mode means nothing; its target is checked too */
    int sticky_ok = ancestor && S_ISDIR(st->st_mode) && (st->st_mode & S_ISVTX);
    if ((st->st_mode & S_IWOTH) && !sticky_ok)
        return "is writable by every user";
    if ((st->st_mode & S_IWGRP) && st->st_gid != 0 && !sticky_ok) {
        snprintf(why, sizeof why, "is writable by group %u", (unsigned)st->st_gid);
        return why;
    }
    return NULL;
}

/* Check `path` itself and every directory above it, up to /. */
static void check_walk_up(const char *path, const char *what)
{
    char buf[PATH_MAX];
    struct stat st;
    if (strlen(path) >= sizeof buf || path[0] != '/')
        die("refusing to run: bad %s path %s", what, path);
    strcpy(buf, path);
    int first = 1;
    for (;;) {
        if (lstat(buf, &st) != 0)
            die("refusing to run: %s %s: %s (is proxyvpn installed? reinstall it with "
                "`sudo ./install.sh`)", what, buf, strerror(errno));
        const char *why = untrusted(&st, !first);
        if (why)
            die("refusing to run: %s (%s) %s; it must be owned by root and writable only "
                "by root", buf, what, why);
        if (strcmp(buf, "/") == 0)
            break;
        char *slash = strrchr(buf, '/');
        if (slash == buf)
            slash[1] = '\0';
        else
            *slash = '\0';
        first = 0;
    }
}

/* The literal path and, if different, the path with every symlink resolved. */
static void check_path(const char *path, const char *what)
{
    char real[PATH_MAX];
    check_walk_up(path, what);
    if (!realpath(path, real))
        die("refusing to run: %s %s: %s", what, path, strerror(errno));
    if (strcmp(real, path) != 0)
        check_walk_up(real, what);
}

static const char *tree_bad_path;
static const char *tree_bad_why;
static char tree_bad_buf[PATH_MAX];

static int tree_visit(const char *fpath, const struct stat *st, int type, struct FTW *ftw)
{
    (void)ftw;
    if (type == FTW_NS || type == FTW_DNR) {
        tree_bad_why = "cannot be read";
    } else {
        tree_bad_why = untrusted(st, 0);
    }
    if (tree_bad_why) {
        snprintf(tree_bad_buf, sizeof tree_bad_buf, "%s", fpath);
        tree_bad_path = tree_bad_buf;
        return 1; /* stop the walk */
    }
    return 0;
}

/* Every entry below `dir` (not following symlinks, not crossing mount points). */
static void check_tree(const char *dir, const char *what)
{
    int rc = nftw(dir, tree_visit, 32, FTW_PHYS | FTW_MOUNT);
    if (rc == -1)
        die("refusing to run: cannot check %s %s: %s", what, dir, strerror(errno));
    if (tree_bad_path)
        die("refusing to run: %s (in the %s) %s; it must be owned by root and writable "
            "only by root (reinstall with `sudo ./install.sh`)", tree_bad_path, what,
            tree_bad_why);
}

static void check_installation(void)
{
    struct stat st;
    check_path(PROXYVPN_PYTHON, "interpreter");
    check_path(PROXYVPN_STDLIB, "Python standard library");
    check_path(PROXYVPN_VENV, "virtual environment");
    check_path(PROXYVPN_PACKAGE, "proxyvpn package");
    if (stat(PROXYVPN_PACKAGE "/__main__.py", &st) != 0 || !S_ISREG(st.st_mode))
        die("refusing to run: %s/__main__.py is missing (reinstall with `sudo ./install.sh`)",
            PROXYVPN_PACKAGE);
    check_tree(PROXYVPN_VENV, "virtual environment");
}

/* ------------------------------------------------------------------ identity */

static int in_group(gid_t gid)
{
    if (getgid() == gid || getegid() == gid)
        return 1;
    int n = getgroups(0, NULL);
    if (n <= 0)
        return 0;
    gid_t *groups = calloc((size_t)n, sizeof *groups);
    if (!groups)
        die("out of memory");
    n = getgroups(n, groups);
    int found = 0;
    for (int i = 0; i < n; i++)
        if (groups[i] == gid)
            found = 1;
    free(groups);
    return found;
}

static void check_group(void)
{
    struct stat st;
    if (stat("/proc/self/exe", &st) != 0)
        die("cannot stat /proc/self/exe: %s (is /proc mounted?)", strerror(errno));
    if (st.st_gid == 0 || in_group(st.st_gid))
        return;
    struct group *gr = getgrgid(st.st_gid);
    const char *name = gr ? gr->gr_name : PROXYVPN_GROUP;
    die("permission denied: only members of group %s may run proxyvpn; add yourself with "
        "`sudo usermod -aG %s $USER`, then log in again", name, name);
}

/* ------------------------------------------------------------------ capabilities */

#define NET_ADMIN_BIT (1U << CAP_NET_ADMIN) /* CAP_NET_ADMIN = 12: in the first u32 */

static int capget_v3(struct __user_cap_data_struct data[2])
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    return (int)syscall(SYS_capget, &hdr, data);
}

static int capset_v3(struct __user_cap_data_struct data[2])
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    return (int)syscall(SYS_capset, &hdr, data);
}

/* Keep CAP_NET_ADMIN (if we were given it) and nothing else, ambient included. */
static void confine_capabilities(void)
{
    struct __user_cap_data_struct data[2];
    if (capget_v3(data) != 0)
        die("capget: %s", strerror(errno));
    int have = (data[0].permitted & NET_ADMIN_BIT) != 0;
    unsigned keep = have ? NET_ADMIN_BIT : 0;

    memset(data, 0, sizeof(struct __user_cap_data_struct) * 2);
    data[0].effective = data[0].permitted = data[0].inheritable = keep;
    if (capset_v3(data) != 0)
        die("capset: %s", strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        die("cannot clear ambient capabilities: %s", strerror(errno));
    if (have && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN, 0, 0) != 0)
        die("cannot make CAP_NET_ADMIN ambient: %s (kernel older than 4.3, or the parent "
            "set SECBIT_NO_CAP_AMBIENT_RAISE)", strerror(errno));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));

    /* Verify rather than trust: exactly what we asked for, in every set. */
    if (capget_v3(data) != 0)
        die("capget: %s", strerror(errno));
    if (data[0].effective != keep || data[0].permitted != keep ||
        data[0].inheritable != keep || data[1].effective || data[1].permitted ||
        data[1].inheritable)
        die("capabilities are not as set (internal error)");
    if (have && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_NET_ADMIN, 0, 0) != 1)
        die("CAP_NET_ADMIN is not ambient (internal error)");
}

/* `proxyvpn exec`: no capability at all, so the caller's command runs as the caller. */
static void drop_all_capabilities(void)
{
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        die("cannot clear ambient capabilities: %s", strerror(errno));
    if (capset_v3(data) != 0)
        die("capset: %s", strerror(errno));
    if (capget_v3(data) != 0)
        die("capget: %s", strerror(errno));
    if (data[0].effective || data[0].permitted || data[0].inheritable || data[1].effective ||
        data[1].permitted || data[1].inheritable)
        die("capabilities are not dropped (internal error)");
}

/* ------------------------------------------------------------------ environment */

static int charset_ok(const char *value, const char *extra, size_t max)
{
    size_t n = strlen(value);
    if (n == 0 || n > max)
        return 0;
    for (const char *p = value; *p; p++) {
        char c = *p;
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 strchr(extra, c) != NULL;
        if (!ok)
            return 0;
    }
    return 1;
}

/* LANG, LANGUAGE and LC_*: locale names like en_US.UTF-8 or de_DE@euro, never paths. */
static int locale_name(const char *entry)
{
    if (strncmp(entry, "LANG=", 5) == 0 || strncmp(entry, "LANGUAGE=", 9) == 0)
        return 1;
    if (strncmp(entry, "LC_", 3) != 0)
        return 0;
    const char *p = entry + 3;
    if (*p == '=')
        return 0;
    while (*p && *p != '=') {
        if (!((*p >= 'A' && *p <= 'Z') || *p == '_'))
            return 0;
        p++;
    }
    return *p == '=';
}

#define MAX_ENV 40

/*
 * The environment python gets, built from nothing:
 *   PATH                fixed (SAFE_PATH)
 *   LANG, LANGUAGE, LC_*  copied when the value is a plain locale name (<= 64 chars of
 *                       [A-Za-z0-9_.@:-], not starting with a dot)
 *   TERM                copied when it is <= 64 chars of [A-Za-z0-9_.+-]
 *   XDG_RUNTIME_DIR     copied only when it is exactly /run/user/<real uid> (the default
 *                       state directory of a non-root user lives there)
 *   PROXYVPN_PROXY_URL, PROXYVPN_PASSWORD
 *                       passed through unchanged: the documented secret channels (not
 *                       argv, which every user can read in /proc/PID/cmdline)
 *   PROXYVPN_LAUNCHER   set to this launcher's installed path (for messages)
 * Nothing else: no PYTHON*, LD_*, HOME, TMPDIR, IFS, ...
 */
static char **build_env(char **old)
{
    static char *env[MAX_ENV + 1];
    static char path[] = "PATH=" SAFE_PATH;
    static char launcher[] = "PROXYVPN_LAUNCHER=" PROXYVPN_LAUNCHER;
    static char xdg[64];
    int n = 0;
    env[n++] = path;
    env[n++] = launcher;
    snprintf(xdg, sizeof xdg, "XDG_RUNTIME_DIR=/run/user/%u", (unsigned)getuid());
    for (char **e = old; e && *e && n < MAX_ENV; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq)
            continue;
        const char *value = eq + 1;
        if (locale_name(*e)) {
            if (value[0] != '.' && charset_ok(value, "_.@:-", 64))
                env[n++] = *e;
        } else if (strncmp(*e, "TERM=", 5) == 0) {
            if (charset_ok(value, "_.+-", 64))
                env[n++] = *e;
        } else if (strncmp(*e, "XDG_RUNTIME_DIR=", 16) == 0) {
            if (strcmp(*e, xdg) == 0)
                env[n++] = xdg;
        } else if (strncmp(*e, "PROXYVPN_PROXY_URL=", 19) == 0 ||
                   strncmp(*e, "PROXYVPN_PASSWORD=", 18) == 0) {
            env[n++] = *e;
        }
    }
    env[n] = NULL;
    return env;
}

/* ------------------------------------------------------------------ main */

extern char **environ;

int main(int argc, char **argv)
{
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;

    sane_fds();
    umask(umask(022) | 022);

    if (getresuid(&ruid, &euid, &suid) != 0 || getresgid(&rgid, &egid, &sgid) != 0)
        die("getresuid: %s", strerror(errno));
    if (ruid != euid || ruid != suid || rgid != egid || rgid != sgid)
        die("refusing to run with mixed user/group ids: the launcher must not be "
            "set-user-ID or set-group-ID (it uses a file capability instead)");
    int root = ruid == 0;
    /* `proxyvpn exec -- CMD` only moves itself into a cgroup (file permissions decide)
     * and execs CMD, which must get the caller's own environment (HOME, DISPLAY, ...) and
     * no capability. With every capability dropped first, the environment cannot buy
     * anything: the process is an ordinary one of the caller's, and -I still keeps
     * PYTHON* from choosing the code. */
    int exec_cmd = argc > 1 && strcmp(argv[1], "exec") == 0;

    if (!root)
        check_group();
    check_installation();
    if (!root && exec_cmd)
        drop_all_capabilities();
    else if (!root)
        confine_capabilities();

    if (argc > 4096)
        die("too many arguments");
    char **args = calloc((size_t)argc + 6, sizeof *args);
    if (!args)
        die("out of memory");
    int n = 0;
    /* argv[0] must be the venv's own path: python finds pyvenv.cfg next to it. */
    args[n++] = (char *)PROXYVPN_PYTHON;
    args[n++] = (char *)"-I";
    args[n++] = (char *)"-B";
    args[n++] = (char *)"-m";
    args[n++] = (char *)"proxyvpn";
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;

    execve(PROXYVPN_PYTHON, args, exec_cmd && !root ? environ : build_env(environ));
    die("cannot execute %s: %s", PROXYVPN_PYTHON, strerror(errno));
}
