/*
 * shoal task launcher and shim: one process per task, started by shoal.runtime.process.
 *
 * Owns: the processes of one task, and TASKDIR/{shim.log, init.pid, exit, stdout.log*,
 * stderr.log*} (its messages, the init's identity, the exit code, rotated logs).
 * Must not touch: anything else under TASKDIR (the agent writes config.json, runtime.json,
 * pids.json, notes.json) and anything outside the task's own namespaces and cgroups.
 *
 * Usage (only by the agent):
 *     shoal-launcher shim TASKDIR LOG_MAX_BYTES LOG_MAX_FILES [host-network] [tty] [stdin-open]
 *   host-network: the init keeps the host's network namespace (no CLONE_NEWNET, lo untouched)
 *   tty: the command's stdin, stdout and stderr are one pseudo-terminal (Docker's --tty),
 *        made in the task's own devpts as runc's console: the init opens it once the mount
 *        plan has run, keeps the terminal side and hands the master to the shim over a
 *        socket; the shim copies what the master reads into stdout.log (a line's "\r\n"
 *        written as "\n"). Nothing writes to it: a shell waits for input for ever.
 *   stdin-open: without tty, the command's stdin is a pipe the shim holds open and never
 *        writes (Docker's OpenStdin): a read waits instead of seeing end-of-file at once.
 *        Without either, stdin is /dev/null.
 *   stdin  = the spec pipe: the whole launch spec (records, see below) then EOF; a spec without
 *            its end record means the agent died (or gave up) before "go": start nothing, write
 *            no exit file, exit 0.
 *   stdout = the ready pipe: "P<init host pid>\n" from the shim right after the clone, then one
 *            byte from the init: "R" = it is being exec'ed (the pipe is close-on-exec: EOF
 *            follows once it runs), "N" = command not found (then exit 127); EOF without "R"
 *            or "N" = the launcher failed (reason in stderr).
 *   stderr = where to complain if TASKDIR/shim.log (the launcher's own messages, opened first
 *            thing) cannot be opened.
 *
 * The agent spawns the launcher *before* it prepares the task (directories, cgroups, the spec),
 * so the launcher's exec and the clone of the namespaces (the costliest step, ~0.7 ms) overlap
 * that work: the init is cloned at once and waits for the spec inside its new, still empty
 * namespaces. Nothing of the task runs before the complete spec (the "go") arrives.
 *
 * Process tree (host view):
 *   shim  (this process, host namespaces, outside the task's cgroups). Clones the init with
 *         new pid, mount, uts, ipc and net namespaces, reports its pid on the ready pipe and
 *         records it with its start time in TASKDIR/init.pid ("PID TICKS\n", one write; /proc
 *         stat field 22: it re-identifies the init after pid reuse), then copies the task's
 *         stdout/stderr pipes into size-rotated log files with a timestamp per line, waits for
 *         the init and writes its exit code to TASKDIR/exit atomically. Survives the agent.
 *         It never reads the spec (which may hold secrets).
 *   init  (ns pid 1, this program's clone): brings lo up and makes every mount private (both
 *         inside its own new namespaces), reads the spec, tells the shim it got a complete one,
 *         joins the task's cgroups (writes 0 to cgroup.procs: the task is accounted before
 *         anything of it runs), sets the hostname, runs the mount plan (root filesystem,
 *         /proc and the task's sysctls, /dev, /sys, user mounts, files written into a
 *         tmpfs, the root made read-only), pivot_root()s into the new root and detaches
 *         the old one, sets the task's resource limits (while it still has
 *         CAP_SYS_RESOURCE, which raising a hard limit needs; tini and the command inherit
 *         them), drops the capability bounding set, switches to the task's user, sets
 *         no_new_privs, chdir()s to the workdir, looks the command up in the task's PATH, reports
 *         ready and execs tini (bind-mounted at /dev/init), which runs the command.
 *
 * Exit code in TASKDIR/exit: the command's (tini passes it on; 128+N if it died of signal N),
 * 128+N if the init itself died of signal N (137: SIGKILL or OOM), 125 if the launcher failed
 * (message in shim.log), 127 command not found.
 *
 * Spec records: TAG (1 byte), LEN (u32 little endian), DATA[LEN]. Multi-field records separate
 * fields with NUL; the last field of a "write" op is raw bytes (may contain NUL).
 *   H hostname   W workdir   A argv item (repeated)   V env "K=V" (repeated)   P the task's PATH
 *   C a cgroup.procs path (repeated)   R the root mount point (host path)   I init path in task
 *   U uid NUL gid NUL groups(comma-separated)   K capability mask to keep (decimal)
 *   O mount-plan op (repeated, in order)   J a network namespace to join (/proc/PID/ns/net:
 *   a pod's sidecar joins its task's main container; done first, before the cgroups)
 *   L resource limit NAME NUL SOFT NUL HARD (repeated; NAME as Docker's --ulimit: nofile,
 *   nproc, core...; SOFT/HARD decimal, -1 = unlimited)   S the init's oom_score_adj (decimal,
 *   -1000..1000; inherited by tini and the command)   F the seccomp filter (raw struct
 *   sock_filter array from runtime/seccomp.py; installed right before the exec of tini, after
 *   no_new_privs: tini and the command run under it; none: unconfined)   E end
 * Mount-plan ops (fields after the op name); WHERE is "root" (path resolved inside the new root
 * as runc resolves a mount destination: RESOLVE_IN_ROOT, every symlink followed inside the
 * root, a dangling one's missing end and any missing component created there, see
 * make_in_root; only once the root is mounted: a "host" mount whose TARGET is R) or "host"
 * (absolute path, as the launcher sees it then; only the last component is made by mkdir).
 * A bind's SOURCE under R is looked up inside the root too. symlink and mknod make their
 * name in the parent so resolved:
 *   mount   WHERE TARGET FSTYPE SOURCE FLAGS DATA KIND(dir|file|none) REMOUNT_FLAGS OPTIONAL
 *   remount WHERE TARGET FLAGS DATA
 *   mkdir   WHERE TARGET MODE [UID GID] (missing parents too; an existing TARGET is left
 *                               alone; a new one owned by UID:GID when given)
 *   symlink TARGET VALUE
 *   mknod   TARGET MODE MAJOR MINOR
 *   write   WHERE TARGET MODE UID GID DATA
 *   sysctl  KEY VALUE           (writes VALUE to proc/sys/KEY in the root, KEY's dots made
 *                               slashes: the plan puts it right after mounting the task's
 *                               /proc, before /proc/sys is bound read-only; the init is in
 *                               the task's net and ipc namespaces, which such a write sets.
 *                               A KEY the kernel lacks: exit 125 naming it)
 *   pivot                       (afterwards "root" paths resolve in the new "/")
 *
 * Log files: one record per line, "<RFC 3339 UTC time with ns> <F|P> <text>\n"; F = the line
 * ended with a newline, P = a partial line (longer than 16 KiB, or unterminated at exit). Files
 * are renamed NAME.log -> NAME.log.1 -> ... when the next record would pass the size limit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "filter.h"
#include "sendfd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

#define MAX_LINE 16384
#define MAX_ITEMS 4096

static const char *taskdir;
static int host_network; /* "host-network": the init keeps the host's network namespace */
static int with_tty;     /* "tty": the command's stdio is a pseudo-terminal */
static int stdin_open;   /* "stdin-open": the command's stdin is a pipe held open */

/* ------------------------------------------------------------------------------ messages */

static void say(const char *fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
}

static void die(int code, const char *fmt, ...) {
    char buf[1800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    say("shoal launcher: %s", buf);
    _exit(code);
}

/* ---------------------------------------------------------------------------------- spec */

struct rec {
    char tag;
    uint32_t len;
    char *data;
};

static char *spec_buf;
static size_t spec_len;
static struct rec recs[MAX_ITEMS];
static int nrecs;

static int read_spec(void) {
    size_t cap = 65536;
    spec_buf = malloc(cap);
    if (!spec_buf) return -1;
    for (;;) {
        if (spec_len == cap) {
            cap *= 2;
            char *n = realloc(spec_buf, cap);
            if (!n) return -1;
            spec_buf = n;
        }
        ssize_t r = read(0, spec_buf + spec_len, cap - spec_len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        spec_len += (size_t)r;
    }
    size_t off = 0;
    while (off + 5 <= spec_len) {
        if (nrecs == MAX_ITEMS) return -1;
        struct rec *rc = &recs[nrecs++];
        rc->tag = spec_buf[off];
        memcpy(&rc->len, spec_buf + off + 1, 4);
        off += 5;
        if (rc->len > spec_len - off) return -1;
        rc->data = spec_buf + off;
        off += rc->len;
        if (rc->tag == 'E') return 0;
    }
    return -1; /* no end record: the agent died mid-way */
}

/* Split a record into NUL-separated fields; the last field takes the rest. */
static int fields(struct rec *rc, char **out, size_t *outlen, int n) {
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (off > rc->len) return -1;
        out[i] = rc->data + off;
        if (i == n - 1) {
            if (outlen) *outlen = rc->len - off;
            return 0;
        }
        char *z = memchr(rc->data + off, '\0', rc->len - off);
        if (!z) return -1;
        off = (size_t)(z - rc->data) + 1;
    }
    return 0;
}

/* A record's data as a C string (records are followed by the next tag byte: copy). */
static char *str(struct rec *rc) {
    char *s = malloc(rc->len + 1);
    if (!s) die(125, "out of memory");
    memcpy(s, rc->data, rc->len);
    s[rc->len] = '\0';
    return s;
}

/* ------------------------------------------------------------------------ init (ns pid 1) */

static int rootfd = -1;
static const char *rootdir;

static long num(const char *s) { return strtol(s, NULL, 0); }

static int open_in_root(const char *path, int flags) {
    if (rootfd < 0) die(125, "the plan uses the root before mounting it");
    struct open_how how = {0};
    how.flags = (uint64_t)(flags | O_CLOEXEC);
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    while (*path == '/') path++;
    if (!*path) path = ".";
    return (int)syscall(SYS_openat2, rootfd, path, &how, sizeof how);
}

/* TARGET inside the root as runc resolves a mount destination (securejoin's rule): every
 * symlink on the way followed *inside* the root — an absolute one from the root, ".." never
 * above it — also the dangling end of a chain, whose missing components are then made there
 * (the last one a file when KIND is "file", else a directory), and an O_PATH fd of the end
 * returned. Safe against a root that changes meanwhile (a volume shared with a running task):
 * every lookup is openat2(RESOLVE_IN_ROOT) from the root and every creation one name made
 * with O_EXCL/mkdirat in a directory so opened, so a swapped-in symlink can only lead
 * elsewhere in the root, never out of it. Fails with ELOOP after 40 links (as Linux). */
static int make_in_root(const char *target, const char *kind) {
    char done[4096] = "";  /* resolved so far: no symlink, no "..", relative to the root */
    char todo[8192];       /* what is left to walk */
    char link[4096], name[NAME_MAX + 1];
    int hops = 0, steps = 0;
    if (snprintf(todo, sizeof todo, "%s", target) >= (int)sizeof todo) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *p = todo;
    for (;;) {
        while (*p == '/') p++;
        if (!*p) break;
        if (++steps > 4096) { /* (a root that keeps changing under the walk) */
            errno = ELOOP;
            return -1;
        }
        char *end = strchrnul(p, '/');
        size_t n = (size_t)(end - p);
        if (n > NAME_MAX) {
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(name, p, n);
        name[n] = '\0';
        const char *after = end;
        while (*after == '/') after++;
        int last = !*after;
        if (strcmp(name, ".") == 0) {
            p = end;
            continue;
        }
        if (strcmp(name, "..") == 0) { /* done holds no symlink: ".." is lexical, clamped */
            char *s = strrchr(done, '/');
            if (s) *s = '\0'; else done[0] = '\0';
            p = end;
            continue;
        }
        int dir = open_in_root(done, O_PATH | O_DIRECTORY);
        if (dir < 0) return -1;
        struct stat st;
        if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
            if (!S_ISLNK(st.st_mode)) {
                close(dir);
                size_t dl = strlen(done);
                if (dl + 1 + n + 1 > sizeof done) {
                    errno = ENAMETOOLONG;
                    return -1;
                }
                if (dl) done[dl++] = '/';
                memcpy(done + dl, name, n + 1);
                p = end;
                continue;
            }
            ssize_t ln = readlinkat(dir, name, link, sizeof link);
            close(dir);
            if (ln < 0) return -1;
            if (++hops > 40) {
                errno = ELOOP;
                return -1;
            }
            if ((size_t)ln >= sizeof link || (size_t)ln + 1 + strlen(end) + 1 > sizeof todo) {
                errno = ENAMETOOLONG;
                return -1;
            }
            link[ln] = '\0';
            if (link[0] == '/') done[0] = '\0';
            memmove(todo + ln + 1, end, strlen(end) + 1); /* the link's text, then the rest */
            memcpy(todo, link, (size_t)ln);
            todo[ln] = '/';
            p = todo;
            continue;
        }
        if (errno != ENOENT) {
            int e = errno;
            close(dir);
            errno = e;
            return -1;
        }
        int r;
        if (last && strcmp(kind, "file") == 0) {
            r = openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
            if (r >= 0) close(r);
        } else {
            r = mkdirat(dir, name, 0755);
        }
        int e = errno;
        close(dir);
        if (r < 0 && e != EEXIST) {
            errno = e;
            return -1;
        }
        /* (the same name again: made now, or by someone else meanwhile) */
    }
    return open_in_root(done, O_PATH);
}

/* Resolve TARGET (WHERE = root|host) to an O_PATH fd, creating it (KIND dir|file) and any
 * missing parent directories inside the root (make_in_root). Never follows a symlink out of
 * the root. */
static int resolve(const char *where, const char *target, const char *kind) {
    if (strcmp(where, "host") == 0) {
        if (strcmp(kind, "dir") == 0 && mkdir(target, 0755) && errno != EEXIST) return -1;
        return open(target, O_PATH | O_CLOEXEC);
    }
    int fd = open_in_root(target, O_PATH);
    if (fd >= 0 || errno != ENOENT || strcmp(kind, "none") == 0) return fd;
    return make_in_root(target, kind);
}

/* The parent directory of the root path REL, made if missing (make_in_root), as an O_PATH
 * fd; *NAME = REL's last component. For ops that make one name there (symlink, mknod). */
static int parent_in_root(char *rel, const char **name) {
    char *slash = strrchr(rel, '/');
    if (!slash) {
        *name = rel;
        return open_in_root("", O_PATH | O_DIRECTORY);
    }
    *slash = '\0';
    int fd = resolve("root", rel, "dir");
    *slash = '/';
    *name = slash + 1;
    return fd;
}

static void fdpath(char *buf, size_t n, int fd) { snprintf(buf, n, "/proc/self/fd/%d", fd); }

/* A target as the user wrote it: "usr/x" in the root is shown as "/usr/x". */
static const char *shown(const char *where, const char *target) {
    static char buf[4096];
    if (strcmp(where, "root") != 0 || target[0] == '/') return target;
    snprintf(buf, sizeof buf, "/%s", target);
    return buf;
}

/* A recursive bind's remount (above) changes only its top mount: what is mounted below the
 * source (a tmpfs under a bound directory, /proc under a bound "/") would stay writable.
 * mount_setattr(2) with AT_RECURSIVE (Linux 5.12) sets the flags on the whole tree, as Docker
 * (25+) and runc do for a read-only bind; on an older kernel the top mount alone is read-only,
 * Docker's fallback too. */
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
struct shoal_mount_attr { uint64_t attr_set, attr_clr, propagation, userns_fd; };
static void rdonly_below(int fd, const char *target, unsigned long reflags) {
    struct shoal_mount_attr attr = {0};
    attr.attr_set = 0x1; /* MOUNT_ATTR_RDONLY */
    if (reflags & MS_NOSUID) attr.attr_set |= 0x2;
    if (reflags & MS_NODEV) attr.attr_set |= 0x4;
    if (reflags & MS_NOEXEC) attr.attr_set |= 0x8;
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) &&
        errno != ENOSYS)
        die(125, "cannot make %s read-only below: %s", target, strerror(errno));
}

/* runc's rule: proc and sysfs are mounted on an ordinary directory of the root (or one made
 * there), never through a symlink of the image. Their masks and read-only binds are
 * resolved again later, after /dev's tmpfs: a /proc -> /dev/x/../../real of the image put
 * procfs at /real through the image's dev/x, which that tmpfs then hid, so every mask found
 * nothing under /proc and was skipped (the task read the host's /proc/timer_list...). */
static void plain_dir_in_root(const char *fstype, const char *target) {
    struct open_how how = {0};
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    const char *rel = target;
    while (*rel == '/') rel++;
    int fd = (int)syscall(SYS_openat2, rootfd, *rel ? rel : ".", &how, sizeof how);
    if (fd >= 0) {
        close(fd);
        return;
    }
    if (errno == ENOENT) { /* (none: made, a directory, by resolve) */
        if (strchr(rel, '/') == NULL) return;
        die(125, "cannot mount %s on /%s: its parent is missing", fstype, rel);
    }
    die(125, "cannot mount %s on /%s: it must be an ordinary directory of the image, not %s",
        fstype, rel, errno == ELOOP ? "a symlink (or below one)" : strerror(errno));
}

static void op_mount(char **f) {
    /* WHERE TARGET FSTYPE SOURCE FLAGS DATA KIND REMOUNT_FLAGS OPTIONAL */
    const char *where = f[0], *target = f[1], *fstype = f[2], *source = f[3], *data = f[5];
    const char *kind = f[6];
    unsigned long flags = (unsigned long)num(f[4]), reflags = (unsigned long)num(f[7]);
    int optional = f[8][0] == '1';
    /* a bind's source inside the root (/proc/sys bound read-only onto itself) is looked up
     * there too: an image's symlink on its way (/proc -> /somewhere) stays in the root */
    int sfd = -1;
    char sp[64];
    size_t rl = rootdir ? strlen(rootdir) : 0;
    if ((flags & MS_BIND) && rootfd >= 0 && strncmp(source, rootdir, rl) == 0 &&
        source[rl] == '/') {
        sfd = open_in_root(source + rl, O_PATH);
        if (sfd < 0 && optional && errno == ENOENT) return;
        if (sfd < 0) die(125, "cannot open %s: %s", source, strerror(errno));
        fdpath(sp, sizeof sp, sfd);
        source = sp;
    }
    if (optional && (flags & MS_BIND) && access(source, F_OK) != 0) {
        if (sfd >= 0) close(sfd);
        return;
    }
    if (strcmp(where, "root") == 0 &&
        (strcmp(fstype, "proc") == 0 || strcmp(fstype, "sysfs") == 0))
        plain_dir_in_root(fstype, target);
    int fd = resolve(where, target, kind);
    if (fd < 0) {
        if (sfd >= 0) close(sfd);
        /* (optional: a mount point that is not there, and cannot be made in a read-only
         * directory: the default image's /etc is the host's, bound read-only) */
        if (optional && (errno == ENOENT || errno == EROFS)) return;
        die(125, "cannot create mount point %s: %s", shown(where, target), strerror(errno));
    }
    /* a mount that needs a directory (a volume, a tmpfs) on a file of the image, or a file's
     * bind on a directory: say so, naming the target (mount(2) would only say ENOTDIR) */
    struct stat st;
    if (strcmp(kind, "none") != 0 && fstat(fd, &st) == 0 &&
        (strcmp(kind, "dir") == 0) != (S_ISDIR(st.st_mode) != 0))
        die(125, "cannot mount %s on %s: the root has a %s there, this mount needs a %s",
            *source ? source : fstype, shown(where, target),
            S_ISDIR(st.st_mode) ? "directory" : "file",
            strcmp(kind, "dir") == 0 ? "directory" : "file");
    char p[64];
    fdpath(p, sizeof p, fd);
    if (mount(*source ? source : NULL, p, *fstype ? fstype : NULL, flags, *data ? data : NULL)) {
        int e = errno;
        if (optional && (e == ENOENT || e == ENODEV)) {
            close(fd);
            if (sfd >= 0) close(sfd);
            return;
        }
        die(125, "cannot mount %s on %s: %s", *source ? source : fstype, shown(where, target),
            strerror(e));
    }
    close(fd);
    if (sfd >= 0) close(sfd);
    if (strcmp(where, "host") == 0 && strcmp(target, rootdir) == 0) {
        /* the root is mounted: "root" paths resolve under it from now on */
        if (rootfd >= 0) close(rootfd);
        rootfd = open(rootdir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (rootfd < 0) die(125, "cannot open %s: %s", rootdir, strerror(errno));
    }
    if (reflags) {
        /* A bind mount's flags (ro, nosuid...) need a remount of the new mount itself. */
        fd = resolve(where, target, "none");
        if (fd < 0) die(125, "cannot reopen %s: %s", target, strerror(errno));
        fdpath(p, sizeof p, fd);
        if (mount(NULL, p, NULL, MS_REMOUNT | MS_BIND | reflags, NULL))
            die(125, "cannot remount %s: %s", target, strerror(errno));
        if ((flags & MS_REC) && (reflags & MS_RDONLY)) rdonly_below(fd, target, reflags);
        close(fd);
    }
}

static void op_remount(char **f) {
    /* WHERE TARGET FLAGS DATA */
    int fd = resolve(f[0], f[1], "none");
    if (fd < 0) die(125, "cannot open %s: %s", f[1], strerror(errno));
    char p[64];
    fdpath(p, sizeof p, fd);
    if (mount(NULL, p, NULL, MS_REMOUNT | (unsigned long)num(f[2]), *f[3] ? f[3] : NULL))
        die(125, "cannot remount %s: %s", f[1], strerror(errno));
    close(fd);
}

static void op_write(char **f, size_t datalen) {
    /* WHERE TARGET MODE UID GID DATA (written through an fd: never a path race) */
    int dfd;
    char *slash = strrchr(f[1], '/');
    if (!slash) die(125, "bad file target %s", f[1]);
    *slash = '\0';
    dfd = resolve(f[0], *f[1] ? f[1] : "/", "dir");
    if (dfd < 0) die(125, "cannot open %s: %s", f[1], strerror(errno));
    char p[64];
    fdpath(p, sizeof p, dfd);
    int dir = open(p, O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    close(dfd);
    if (dir < 0) die(125, "cannot open %s: %s", f[1], strerror(errno));
    *slash = '/';
    mode_t mode = (mode_t)num(f[2]);
    int fd = openat(dir, slash + 1, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
    close(dir);
    if (fd < 0) die(125, "cannot create %s: %s", f[1], strerror(errno));
    const char *data = f[5];
    while (datalen > 0) {
        ssize_t w = write(fd, data, datalen);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) die(125, "cannot write %s: %s", f[1], strerror(errno));
        data += w;
        datalen -= (size_t)w;
    }
    if (fchown(fd, (uid_t)num(f[3]), (gid_t)num(f[4])) || fchmod(fd, mode))
        die(125, "cannot set the owner/mode of %s: %s", f[1], strerror(errno));
    close(fd);
}

static void op_sysctl(char **f) {
    /* KEY VALUE: through the task's own /proc (see the header); KEY is checked upstream
     * (dotted, no empty component), so the path stays under proc/sys */
    char path[512];
    if (snprintf(path, sizeof path, "proc/sys/%s", f[0]) >= (int)sizeof path)
        die(125, "sysctl %s: name too long", f[0]);
    for (char *p = path + strlen("proc/sys/"); *p; p++)
        if (*p == '.') *p = '/';
    int fd = open_in_root(path, O_WRONLY);
    if (fd < 0 && errno == ENOENT)
        die(125, "sysctl %s: this kernel has no such setting (no /%s)", f[0], path);
    if (fd < 0) die(125, "sysctl %s: cannot open /%s: %s", f[0], path, strerror(errno));
    size_t n = strlen(f[1]);
    ssize_t w = write(fd, f[1], n);
    if (w < 0 || (size_t)w != n)
        die(125, "sysctl %s: cannot set it to %s: %s", f[0], f[1],
            w < 0 ? strerror(errno) : "short write");
    close(fd);
}

static void op_pivot(void) {
    if (chdir(rootdir)) die(125, "cannot enter %s: %s", rootdir, strerror(errno));
    if (syscall(SYS_pivot_root, ".", ".")) die(125, "pivot_root: %s", strerror(errno));
    /* The old root is now stacked on "."; detach it and everything below it. */
    if (umount2(".", MNT_DETACH)) die(125, "cannot detach the old root: %s", strerror(errno));
    if (chdir("/")) die(125, "chdir /: %s", strerror(errno));
    close(rootfd);
    rootfd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) die(125, "open /: %s", strerror(errno));
}

static void run_plan(void) {
    for (int i = 0; i < nrecs; i++) {
        struct rec *rc = &recs[i];
        if (rc->tag != 'O') continue;
        char *f[10];
        size_t datalen = 0;
        char *op = rc->data;
        /* the agent NUL-terminates every field except write's data */
        if (strcmp(op, "mount") == 0) {
            if (fields(rc, f, NULL, 10)) die(125, "bad mount op");
            op_mount(f + 1);
        } else if (strcmp(op, "remount") == 0) {
            if (fields(rc, f, NULL, 5)) die(125, "bad remount op");
            op_remount(f + 1);
        } else if (strcmp(op, "mkdir") == 0) {
            int owned = fields(rc, f, NULL, 6) == 0; /* (with UID GID) */
            if (!owned && fields(rc, f, NULL, 4)) die(125, "bad mkdir op");
            int fd = strcmp(f[1], "host") == 0 ? open(f[2], O_PATH | O_CLOEXEC)
                                               : open_in_root(f[2], O_PATH);
            if (fd >= 0) { /* there already: left as it is (a workdir of /tmp keeps 1777) */
                close(fd);
                continue;
            }
            fd = resolve(f[1], f[2], "dir");
            if (fd < 0) die(125, "cannot create %s: %s", shown(f[1], f[2]), strerror(errno));
            struct stat made; /* (a directory: never chown/chmod a file a task swapped in) */
            if (fstat(fd, &made) || !S_ISDIR(made.st_mode))
                die(125, "cannot create %s: not a directory", shown(f[1], f[2]));
            char p[64];
            fdpath(p, sizeof p, fd);
            /* (the owner first: a chown clears the set-group-ID bit the mode may have) */
            if (owned && chown(p, (uid_t)num(f[4]), (gid_t)num(f[5])))
                die(125, "chown %s: %s", shown(f[1], f[2]), strerror(errno));
            if (chmod(p, (mode_t)num(f[3]))) die(125, "chmod %s: %s", f[2], strerror(errno));
            close(fd);
        } else if (strcmp(op, "symlink") == 0) {
            if (fields(rc, f, NULL, 3)) die(125, "bad symlink op");
            while (*f[1] == '/') f[1]++;
            const char *name;
            int dir = parent_in_root(f[1], &name); /* (dev/fd: in the root's dev, as mounted) */
            if (dir < 0 || (symlinkat(f[2], dir, name) && errno != EEXIST))
                die(125, "symlink /%s: %s", f[1], strerror(errno));
            close(dir);
        } else if (strcmp(op, "mknod") == 0) {
            if (fields(rc, f, NULL, 5)) die(125, "bad mknod op");
            while (*f[1] == '/') f[1]++;
            const char *name;
            int dir = parent_in_root(f[1], &name);
            if (dir < 0 || mknodat(dir, name, (mode_t)num(f[2]),
                                   makedev((unsigned)num(f[3]), (unsigned)num(f[4]))))
                die(125, "mknod /%s: %s", f[1], strerror(errno));
            close(dir);
        } else if (strcmp(op, "write") == 0) {
            if (fields(rc, f, &datalen, 7)) die(125, "bad write op");
            op_write(f + 1, datalen);
            explicit_bzero(f[6], datalen);
        } else if (strcmp(op, "sysctl") == 0) {
            if (fields(rc, f, NULL, 3)) die(125, "bad sysctl op");
            op_sysctl(f + 1);
        } else if (strcmp(op, "pivot") == 0) {
            op_pivot();
        } else {
            die(125, "unknown op %s", op);
        }
    }
}

/* The task's resource limits (L records; names as Docker's --ulimit). Set by the init while it
 * is still root with the agent's capabilities (raising a hard limit needs CAP_SYS_RESOURCE),
 * after the mount plan (a small fsize or nofile must not break the plan's own writes);
 * inherited by tini and the command through exec. */
static const struct { const char *name; int resource; } rlimit_names[] = {
    {"core", RLIMIT_CORE},         {"cpu", RLIMIT_CPU},       {"data", RLIMIT_DATA},
    {"fsize", RLIMIT_FSIZE},       {"locks", RLIMIT_LOCKS},   {"memlock", RLIMIT_MEMLOCK},
    {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE},     {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC},       {"rss", RLIMIT_RSS},       {"rtprio", RLIMIT_RTPRIO},
    {"rttime", RLIMIT_RTTIME},     {"sigpending", RLIMIT_SIGPENDING},
    {"stack", RLIMIT_STACK},
};

static rlim_t rlim_value(const char *name, const char *text) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < -1) die(125, "ulimit %s: bad value %s", name, text);
    return v == -1 ? RLIM_INFINITY : (rlim_t)v;
}

static void set_rlimits(void) {
    for (int i = 0; i < nrecs; i++) {
        if (recs[i].tag != 'L') continue;
        char *f[3];
        if (fields(&recs[i], f, NULL, 3)) die(125, "bad ulimit record");
        int res = -1;
        for (size_t j = 0; j < sizeof rlimit_names / sizeof rlimit_names[0]; j++)
            if (strcmp(f[0], rlimit_names[j].name) == 0) res = rlimit_names[j].resource;
        if (res < 0) die(125, "unknown ulimit %s", f[0]);
        struct rlimit rl = {rlim_value(f[0], f[1]), rlim_value(f[0], f[2])};
        if (setrlimit(res, &rl)) {
            int e = errno;
            die(125, "cannot set ulimit %s=%s:%s: %s%s", f[0], f[1], f[2], strerror(e),
                e == EPERM ? " (a hard limit above the agent's own needs CAP_SYS_RESOURCE; "
                             "nofile's is at most fs.nr_open)" : "");
        }
    }
}

static void lo_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr)) die(125, "cannot bring lo up: %s", strerror(errno));
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr)) die(125, "cannot bring lo up: %s", strerror(errno));
    close(s);
}

/* execvp's search: a name with '/' is used as is; otherwise each PATH entry ("" = "."). */
static int found(const char *name, const char *path, char *out, size_t n) {
    struct stat st;
    if (strchr(name, '/')) {
        snprintf(out, n, "%s", name);
        return stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0;
    }
    const char *p = path;
    for (;;) {
        const char *colon = strchr(p, ':');
        size_t len = colon ? (size_t)(colon - p) : strlen(p);
        if (len == 0)
            snprintf(out, n, "./%s", name);
        else
            snprintf(out, n, "%.*s/%s", (int)len, p, name);
        if (stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0) return 1;
        if (!colon) return 0;
        p = colon + 1;
    }
}

static void write_all(int fd, const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

/* S record: the task's oom_score_adj, written while /proc is still the host's (its "self"
 * is this init); a value below the agent's own needs CAP_SYS_RESOURCE. */
static void set_oom_score_adj(void) {
    for (int i = 0; i < nrecs; i++) {
        if (recs[i].tag != 'S') continue;
        char *v = str(&recs[i]);
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, v, strlen(v)) != (ssize_t)strlen(v)) {
            int e = errno;
            die(125, "cannot set oom_score_adj %s: %s%s", v, strerror(e),
                e == EACCES ? " (lowering it needs CAP_SYS_RESOURCE, which this node's agent "
                              "lacks)" : "");
        }
        close(fd);
        free(v);
    }
}

/* "tty": a pseudo-terminal of the task's own devpts (the plan mounted /dev/pts with
 * newinstance; the root is pivoted), as runc's console: the master goes to the shim over the
 * console socket, the terminal side is returned. 80x24, as a terminal without a client. */
static int open_console(int sock) {
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) die(125, "tty: cannot open /dev/pts/ptmx: %s", strerror(errno));
    int unlock = 0;
    if (ioctl(master, TIOCSPTLCK, &unlock)) die(125, "tty: cannot unlock: %s", strerror(errno));
    int term = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (term < 0) die(125, "tty: cannot open the terminal: %s", strerror(errno));
    struct winsize ws = {.ws_row = 24, .ws_col = 80};
    if (ioctl(term, TIOCSWINSZ, &ws)) die(125, "tty: cannot size it: %s", strerror(errno));
    /* /dev/console is the terminal too, as runc binds it (what writes to the console reaches
     * the log); /dev is the task's own tmpfs */
    int n;
    char pts[64];
    if (ioctl(master, TIOCGPTN, &n)) die(125, "tty: cannot name it: %s", strerror(errno));
    snprintf(pts, sizeof pts, "/dev/pts/%d", n);
    if (mount(pts, "/dev/console", NULL, MS_BIND, NULL)) /* (the plan made the file) */
        die(125, "tty: cannot bind it at /dev/console: %s", strerror(errno));
    if (send_fd(sock, master))
        die(125, "tty: cannot hand the master to the shim: %s", strerror(errno));
    close(master);
    close(sock);
    return term;
}

static int init_main(int out_w, int err_w, int go_w, int in_r, int console) {
    const char *hostname = "", *workdir = "/", *path = "", *init = "";
    char *argv[MAX_ITEMS + 4], *envp[MAX_ITEMS + 1];
    int argc = 0, envc = 0, ngroups = 0;
    uid_t uid = 0;
    gid_t gid = 0, groups[256];
    uint64_t keep = ~0ULL;
    int have_user = 0;
    const char *filter = NULL; /* the seccomp filter (F record), none: unconfined */
    uint32_t filter_len = 0;

    signal(SIGPIPE, SIG_IGN);
    umask(0);
    /* The ready pipe moves to a close-on-exec fd: the agent sees EOF once tini is exec'ed. */
    int ready = fcntl(1, F_DUPFD_CLOEXEC, 3);
    if (ready < 0) die(125, "dup: %s", strerror(errno));
    /* What needs no spec, done while the agent still prepares the task: both only touch the
     * new namespaces, and use no resources worth accounting. */
    if (!host_network) lo_up(); /* (the host's lo is the host's business) */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
        die(125, "cannot make mounts private: %s", strerror(errno));
    write_all(go_w, "W", 1);   /* waiting for the spec: the shim may have the CPU now */
    if (read_spec()) return 0; /* no complete spec: the agent died (or gave up) before "go" */
    write_all(go_w, "G", 1);   /* the shim records an exit code from now on */
    close(go_w);
    /* a pod's extra container: into the task's network namespace (its own new one, empty but
     * for lo, is dropped); /proc is still the host's here, so PID is a host pid */
    for (int i = 0; i < nrecs; i++) {
        if (recs[i].tag != 'J') continue;
        char *p = str(&recs[i]);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWNET)) die(125, "cannot join the network namespace %s: %s", p, strerror(errno));
        close(fd);
        free(p);
    }
    /* cgroups first: everything from here on (mounts, the command) is accounted and limited */
    for (int i = 0; i < nrecs; i++) {
        if (recs[i].tag != 'C') continue;
        char *p = str(&recs[i]);
        int fd = open(p, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) die(125, "cannot join cgroup %s: %s", p, strerror(errno));
        close(fd);
        free(p);
    }
    set_oom_score_adj();
    argv[argc++] = "tini";
    argv[argc++] = "--";
    for (int i = 0; i < nrecs; i++) {
        struct rec *rc = &recs[i];
        switch (rc->tag) {
        case 'H': hostname = str(rc); break;
        case 'W': workdir = str(rc); break;
        case 'P': path = str(rc); break;
        case 'I': init = str(rc); break;
        case 'R': rootdir = str(rc); break;
        case 'A': if (argc < MAX_ITEMS) argv[argc++] = str(rc); break;
        case 'V': if (envc < MAX_ITEMS) envp[envc++] = str(rc); break;
        case 'K': { char *s = str(rc); keep = strtoull(s, NULL, 10); free(s); break; }
        case 'F': filter = rc->data; filter_len = rc->len; break;
        case 'U': {
            char *f[3];
            if (fields(rc, f, NULL, 3)) die(125, "bad user record");
            char *g = str(rc) + (f[2] - rc->data); /* the groups field, NUL-terminated copy */
            uid = (uid_t)num(f[0]);
            gid = (gid_t)num(f[1]);
            for (char *t = strtok(g, ","); t && ngroups < 256; t = strtok(NULL, ","))
                groups[ngroups++] = (gid_t)num(t);
            have_user = 1;
            break;
        }
        default: break;
        }
    }
    argv[argc] = NULL;
    envp[envc] = NULL;
    if (argc < 3 || !*init || !rootdir) die(125, "incomplete spec");

    if (sethostname(hostname, strlen(hostname))) die(125, "cannot set the hostname: %s", strerror(errno));
    run_plan();
    if (rootfd < 0) die(125, "the plan never mounts the root");
    /* (the terminal before the limits: a small nofile must not break its opening) */
    int tty = console >= 0 ? open_console(console) : -1;
    set_rlimits();

    /* capabilities: bounding set first (needs CAP_SETPCAP), then the user, then the sets */
    for (int c = 0; c < 64; c++) {
        if (keep & (1ULL << c)) continue;
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) && errno == EINVAL) break;
    }
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (have_user) {
        if (setgroups((size_t)ngroups, groups)) die(125, "setgroups: %s", strerror(errno));
        if (setresgid(gid, gid, gid)) die(125, "setgid %u: %s", gid, strerror(errno));
        /* the task's stdout/stderr pipes are the user's, as runc's fixStdioPermissions: a
         * non-root command can open /dev/stdout (/proc/self/fd/1) */
        if (uid != 0 && (fchown(out_w, uid, (gid_t)-1) || fchown(err_w, uid, (gid_t)-1)))
            die(125, "cannot hand the output pipes to uid %u: %s", uid, strerror(errno));
        /* and its terminal, as runc's console, or its open stdin pipe (stdin-open) */
        if (tty >= 0 && uid != 0 && fchown(tty, uid, (gid_t)-1))
            die(125, "cannot hand the terminal to uid %u: %s", uid, strerror(errno));
        if (stdin_open && tty < 0 && uid != 0 && fchown(in_r, uid, (gid_t)-1))
            die(125, "cannot hand the stdin pipe to uid %u: %s", uid, strerror(errno));
        if (setresuid(uid, uid, uid)) die(125, "setuid %u: %s", uid, strerror(errno));
    }
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (uid == 0) {
        data[0].effective = data[0].permitted = (uint32_t)keep;
        data[1].effective = data[1].permitted = (uint32_t)(keep >> 32);
    }
    if (syscall(SYS_capset, &hdr, data)) die(125, "capset: %s", strerror(errno));

    if (chdir(workdir)) die(125, "workdir not found: %s", workdir);
    char resolved[4096];
    if (!found(argv[2], path, resolved, sizeof resolved)) {
        write_all(ready, "N", 1);
        char msg[4200];
        int n = snprintf(msg, sizeof msg, "command not found: %s\n", argv[2]);
        if (n > 0) write_all(err_w, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        _exit(127);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die(125, "no_new_privs: %s", strerror(errno));
    umask(022); /* the task's, as runc's default (the init's 0 was for the mount plan) */
    int errfd = fcntl(2, F_DUPFD_CLOEXEC, 3);
    write_all(ready, "R", 1);
    if (tty >= 0) { /* a session of its own, with the terminal as its controlling one */
        if (setsid() < 0 || ioctl(tty, TIOCSCTTY, 0) || dup2(tty, 0) < 0 || dup2(tty, 1) < 0 ||
            dup2(tty, 2) < 0)
            _exit(125);
    } else if (dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0) {
        _exit(125);
    }
    /* tini starts with default dispositions and an empty mask; it sets up its own */
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
    /* glibc's signal() refuses its internal real-time signals (32, 33), so an ignored one
       inherited from whoever started the agent would survive exec: reset them with the raw
       syscall (an all-zero kernel sigaction is SIG_DFL, no flags, empty mask on every ABI) */
    for (int s = 32; s < 34; s++) {
        unsigned long ksa[4] = {0, 0, 0, 0};
        syscall(SYS_rt_sigaction, s, ksa, NULL, sizeof(unsigned long));
    }
    syscall(SYS_close_range, 3, ~0U, 4 /* CLOSE_RANGE_CLOEXEC */);
    if (filter && install_filter(filter, filter_len)) {
        int e = errno;
        if (errfd >= 0) dup2(errfd, 2);
        die(125, "cannot install the seccomp filter: %s", strerror(e));
    }
    execve(init, argv, envp);
    int e = errno;
    if (errfd >= 0) dup2(errfd, 2);
    die(125, "cannot exec the init %s: %s", init, strerror(e));
    return 125;
}

/* --------------------------------------------------------------------- shim: logs, exit */

struct stream {
    const char *name; /* "stdout" */
    int in;           /* read end of the task's pipe; -1 at EOF */
    int out;          /* current log file */
    off_t size;
    size_t len;
    char buf[MAX_LINE];
};

static long long log_max = 10 * 1024 * 1024;
static int log_files = 3;

static int open_log(struct stream *s, int trunc) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s.log", taskdir, s->name);
    s->out = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (trunc ? O_TRUNC : 0), 0640);
    if (s->out < 0) return -1;
    struct stat st;
    s->size = fstat(s->out, &st) == 0 ? st.st_size : 0;
    return 0;
}

static void rotate(struct stream *s) {
    char from[4096], to[4096];
    close(s->out);
    for (int i = log_files - 1; i >= 1; i--) {
        if (i == 1)
            snprintf(from, sizeof from, "%s/%s.log", taskdir, s->name);
        else
            snprintf(from, sizeof from, "%s/%s.log.%d", taskdir, s->name, i - 1);
        snprintf(to, sizeof to, "%s/%s.log.%d", taskdir, s->name, i);
        rename(from, to);
    }
    if (open_log(s, 1)) {
        say("shoal shim: cannot reopen %s.log: %s", s->name, strerror(errno));
        s->out = open("/dev/null", O_WRONLY | O_CLOEXEC);
    }
}

static char outbuf[4 * MAX_LINE];
static size_t outlen;

static void flush_out(struct stream *s) {
    size_t off = 0;
    while (off < outlen) {
        ssize_t w = write(s->out, outbuf + off, outlen - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break; /* disk full: the lines are lost, the task goes on */
        off += (size_t)w;
    }
    s->size += (off_t)outlen;
    outlen = 0;
}

static void emit(struct stream *s, const char *ts, char flag, const char *line, size_t n) {
    size_t reclen = 30 + 3 + n + 1;
    if (outlen + reclen > sizeof outbuf) flush_out(s);
    if (s->size + (off_t)outlen + (off_t)reclen > log_max && s->size + (off_t)outlen > 0) {
        flush_out(s);
        rotate(s);
    }
    memcpy(outbuf + outlen, ts, 30);
    outbuf[outlen + 30] = ' ';
    outbuf[outlen + 31] = flag;
    outbuf[outlen + 32] = ' ';
    memcpy(outbuf + outlen + 33, line, n);
    outbuf[outlen + 33 + n] = '\n';
    outlen += reclen;
}

static void stamp(char *ts) {
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, 20, "%Y-%m-%dT%H:%M:%S", &tm); /* 19 characters */
    unsigned long ns = (unsigned long)now.tv_nsec;
    ts[19] = '.';
    for (int i = 28; i >= 20; i--, ns /= 10) ts[i] = (char)('0' + ns % 10);
    ts[29] = 'Z';
    ts[30] = '\0';
}

/* Read what is available; returns 0 at EOF. */
static int pump(struct stream *s) {
    ssize_t r = read(s->in, s->buf + s->len, sizeof s->buf - s->len);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    char ts[31];
    stamp(ts);
    if (r <= 0) {
        if (s->len) emit(s, ts, 'P', s->buf, s->len);
        s->len = 0;
        flush_out(s);
        close(s->in);
        s->in = -1;
        return 0;
    }
    s->len += (size_t)r;
    size_t start = 0;
    for (size_t i = 0; i < s->len; i++) {
        if (s->buf[i] == '\n') {
            size_t end = i;
            if (with_tty && end > start && s->buf[end - 1] == '\r') end--; /* the tty's ONLCR */
            emit(s, ts, 'F', s->buf + start, end - start);
            start = i + 1;
        }
    }
    if (start == 0 && s->len == sizeof s->buf) { /* a line longer than the buffer */
        emit(s, ts, 'P', s->buf, s->len);
        start = s->len;
    }
    memmove(s->buf, s->buf + start, s->len - start);
    s->len -= start;
    flush_out(s);
    return 1;
}

/* TASKDIR/init.pid: the init's host pid and start time, for an agent adopting the task (even
 * after this shim died). Written while the init sets itself up. */
static void record_init(pid_t child) {
    char path[4096], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)child);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0) close(fd);
    char *p = n > 0 ? (buf[n] = '\0', strrchr(buf, ')')) : NULL;
    /* after "comm)": state is field 3, the start time field 22 */
    for (int field = 2; p && field < 22; field++) p = strchr(p + 1, ' ');
    if (!p) {
        say("shoal shim: cannot read %s", path);
        return;
    }
    unsigned long long ticks = strtoull(p + 1, NULL, 10);
    /* One small write into a new file: a reader sees it whole, or empty (then it looks the
     * init up as the shim's child), never half of it. */
    snprintf(path, sizeof path, "%s/init.pid", taskdir);
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    int len = snprintf(buf, sizeof buf, "%d %llu\n", (int)child, ticks);
    if (fd < 0 || write(fd, buf, (size_t)len) != len || close(fd))
        say("shoal shim: cannot write %s: %s", path, strerror(errno));
}

/* The master of the task's terminal, sent by the init (open_console); -1 at EOF. */
static int receive_console(int sock) {
    char byte;
    struct iovec iov = {&byte, 1};
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    ssize_t r;
    do r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); while (r < 0 && errno == EINTR);
    struct cmsghdr *c = r == 1 ? CMSG_FIRSTHDR(&msg) : NULL;
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static int shim_main(void) {
    struct stream out = {.name = "stdout"}, err = {.name = "stderr"};
    int op[2], ep[2], gp[2];
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0 && devnull < 3) { /* keep 0-2 for stdio: dup2 onto them must copy */
        int high = fcntl(devnull, F_DUPFD_CLOEXEC, 3);
        close(devnull);
        devnull = high;
    }
    if (devnull < 0 || pipe2(op, O_CLOEXEC) || pipe2(ep, O_CLOEXEC) || pipe2(gp, O_CLOEXEC))
        die(125, "cannot create pipes: %s", strerror(errno));
    int ip[2] = {-1, -1}, cs[2] = {-1, -1}; /* stdin-open's pipe, tty's console socket */
    if (stdin_open && !with_tty && pipe2(ip, O_CLOEXEC))
        die(125, "cannot create the stdin pipe: %s", strerror(errno));
    if (with_tty && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, cs))
        die(125, "cannot create the console socket: %s", strerror(errno));
    unsigned long flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | SIGCHLD;
    if (!host_network) flags |= CLONE_NEWNET;
    pid_t child = (pid_t)syscall(SYS_clone, flags, NULL, NULL, NULL, NULL);
    if (child < 0) die(125, "clone: %s", strerror(errno));
    if (child == 0) {
        close(op[0]);
        close(ep[0]);
        close(gp[0]);
        if (ip[1] >= 0) close(ip[1]);
        if (cs[0] >= 0) close(cs[0]);
        _exit(init_main(op[1], ep[1], gp[1], ip[0] >= 0 ? ip[0] : devnull, cs[1]));
    }
    /* The spec and the ready pipe are the init's: report its pid, keep neither (the agent's
     * writes must fail, not block, if the init dies; the agent waits for the init's EOF). */
    char msg[32];
    int len = snprintf(msg, sizeof msg, "P%d\n", (int)child);
    write_all(1, msg, (size_t)len);
    dup2(devnull, 0);
    dup2(devnull, 1);
    close(op[1]);
    close(ep[1]);
    close(gp[1]);
    /* stdin-open: the write end stays open, unwritten, as long as this shim lives */
    if (ip[0] >= 0) close(ip[0]);
    if (cs[1] >= 0) close(cs[1]);
    /* The init usually runs on this CPU (the agent is busy on the other one, preparing the
     * task): let it get ready for the spec first, our own files can wait that long. */
    char go = 0;
    if (read(gp[0], &go, 1) < 0) go = 0;
    record_init(child);
    int failed = open_log(&out, 0) || open_log(&err, 0);
    if (failed) {
        say("shoal launcher: cannot open the logs: %s", strerror(errno));
        kill(child, SIGKILL);
    }
    /* with a tty the command writes to its terminal: stdout.log gets what the master reads,
     * once the init sends it (cs[0]); the output pipe is not used */
    out.in = with_tty ? (close(op[0]), -1) : op[0];
    err.in = ep[0];
    int console = cs[0];
    int pidfd = (int)syscall(SYS_pidfd_open, child, 0);
    int status = 0, reaped = 0;
    struct timespec deadline = {0, 0};
    while (out.in >= 0 || err.in >= 0 || console >= 0) {
        struct pollfd p[4];
        int n = 0, io = -1, ie = -1, ip = -1, ic = -1;
        if (out.in >= 0) { io = n; p[n++] = (struct pollfd){out.in, POLLIN, 0}; }
        if (err.in >= 0) { ie = n; p[n++] = (struct pollfd){err.in, POLLIN, 0}; }
        if (console >= 0) { ic = n; p[n++] = (struct pollfd){console, POLLIN, 0}; }
        if (!reaped && pidfd >= 0) { ip = n; p[n++] = (struct pollfd){pidfd, POLLIN, 0}; }
        int timeout = -1;
        if (reaped) {
            /* The pid namespace is gone; its processes die with it, and so do the writers.
             * Bound the wait in case a write end leaked out of the task. */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long ms = (deadline.tv_sec - now.tv_sec) * 1000 + (deadline.tv_nsec - now.tv_nsec) / 1000000;
            if (ms <= 0) break;
            timeout = (int)ms;
        }
        int r = poll(p, (nfds_t)n, timeout);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) break;
        if (io >= 0 && p[io].revents) pump(&out);
        if (ie >= 0 && p[ie].revents) pump(&err);
        if (ic >= 0 && p[ic].revents) {
            out.in = receive_console(console); /* -1: the init died before it had one */
            close(console);
            console = -1;
        }
        if (ip >= 0 && p[ip].revents) {
            if (waitpid(child, &status, 0) == child) reaped = 1;
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            deadline.tv_sec += 5;
        }
    }
    if (!reaped) {
        while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
    }
    if (read(gp[0], &go, 1) != 1 || go != 'G') return 0; /* no complete spec: no task */
    int code = failed ? 125 : WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    char tmp[4096], fin[4096], txt[16];
    snprintf(tmp, sizeof tmp, "%s/exit.tmp", taskdir);
    snprintf(fin, sizeof fin, "%s/exit", taskdir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int n = snprintf(txt, sizeof txt, "%d\n", code);
    if (fd < 0 || write(fd, txt, (size_t)n) != n || close(fd) || rename(tmp, fin))
        say("shoal shim: cannot write %s: %s", fin, strerror(errno));
    return code;
}

int main(int argc, char **argv) {
    int bad = argc < 5 || strcmp(argv[1], "shim") != 0;
    for (int i = 5; i < argc && !bad; i++) {
        if (strcmp(argv[i], "host-network") == 0) host_network = 1;
        else if (strcmp(argv[i], "tty") == 0) with_tty = 1;
        else if (strcmp(argv[i], "stdin-open") == 0) stdin_open = 1;
        else bad = 1;
    }
    if (bad) {
        say("usage: %s shim TASKDIR LOG_MAX_BYTES LOG_MAX_FILES [host-network] [tty] "
            "[stdin-open] (started by the shoal agent only)", argv[0]);
        return 125;
    }
    taskdir = argv[2];
    char path[4096];
    snprintf(path, sizeof path, "%s/shim.log", taskdir);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0) die(125, "cannot open %s: %s", path, strerror(errno));
    if (fd != 2) {
        if (dup2(fd, 2) < 0) die(125, "cannot use %s: %s", path, strerror(errno));
        close(fd);
    } else {
        fcntl(2, F_SETFD, 0);
    }
    log_max = strtoll(argv[3], NULL, 10);
    log_files = (int)strtol(argv[4], NULL, 10);
    if (log_max < 4096) log_max = 4096;
    if (log_files < 1) log_files = 1;
    return shim_main();
}
