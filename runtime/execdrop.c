/*
 * shoal-execdrop: run a command with a task's credentials and capabilities, nothing more.
 *
 * Owns: nothing but its own process. Used by the agent's exec health checks (node/health.py):
 * nsenter (util-linux) enters the task's namespaces and root as root with every capability,
 * then execs this program (passed as an inherited fd, /proc/self/fd/N: it need not exist in the
 * task's image; statically linked, so no loader is looked up there), which takes the
 * task's credentials as its init has them — the launcher (launcher.c) drops the same way —
 * before it execs the check. Without it a check of a task running as root would run with
 * every capability of the host's root, where the task itself runs with its reduced set. It
 * takes the task's resource limits too (those of the task's init, pid 1 of the pid namespace
 * nsenter entered: --ulimit), as Docker runs an exec check with the container's rlimits.
 *
 * `shoal exec -t` (node/execs.py) runs it with --console: the command's stdin, stdout and
 * stderr are then a pseudo-terminal of the task's own devpts (nsenter entered the task's mount
 * namespace and root: /dev/pts/ptmx is the task's), its controlling terminal, owned by the
 * task's user, as runc's console for `docker exec -t`; the master goes to the agent over the
 * unix socket FD (SCM_RIGHTS), which is then closed.
 *
 * `shoal exec` also gives --env-fd (the command's environment, read from an fd: nsenter and
 * the host shell before it run with a fixed minimal one, never the task's), --user (looked up
 * here, in the task's own /etc/passwd and /etc/group: we are in its root) and --workdir.
 * Before it execs the command it closes every fd but 0-2 (the helper's own among them).
 *
 * `shoal exec -d` gives --detach SOCK (a unix socket, as --console): just before the exec
 * this program makes a close-on-exec pipe, hands its read end to the agent over SOCK
 * (SCM_RIGHTS) and puts /dev/null on stdout and stderr (unless a --console terminal is on
 * them). Only this process holds the write end (nsenter, which also holds SOCK, never saw
 * it): a successful exec closes it, and the agent reads EOF — the command runs; a failed one
 * writes the reason there before this program exits 126/127. So the agent answers a detached
 * exec only once the command really started.
 *
 * `--seccomp-fd FD`: the task's seccomp filter (runtime/seccomp.py's bytes, as the launcher's
 * F record), read from the fd and installed as the last step before the exec, as the task's
 * own processes run under it (Docker's exec takes its container's profile).
 *
 * Usage: shoal-execdrop [--console FD] [--env-fd FD] [--user SPEC] [--workdir DIR]
 *                       [--detach SOCK] [--seccomp-fd FD] UID GID GROUPS CAPMASK PROG [ARGS...]
 *   GROUPS  supplementary gids, comma-separated ("" = none)
 *   CAPMASK capabilities the task keeps (bounding set; also permitted/effective for uid 0),
 *           hexadecimal as /proc/PID/status CapBnd shows it
 * Exit: PROG's; 125 if a step failed, 127 if PROG was not found (message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "filter.h"
#include "sendfd.h"

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

static int fail(const char *what) {
    fprintf(stderr, "shoal-execdrop: %s: %s\n", what, strerror(errno));
    return 125;
}

/* --console: a terminal of the task's devpts as stdin/stdout/stderr and controlling
 * terminal; the master to the agent over ``sock``. 0, or 125 with a message. */
static int console(int sock, uid_t uid) {
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) return fail("open /dev/pts/ptmx");
    int unlock = 0;
    if (ioctl(master, TIOCSPTLCK, &unlock)) return fail("unlock the terminal");
    int term = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (term < 0) return fail("open the terminal");
    if (uid != 0 && fchown(term, uid, (gid_t)-1)) return fail("chown the terminal");
    if (setsid() < 0 || ioctl(term, TIOCSCTTY, 0)) return fail("make it the controlling terminal");
    if (dup2(term, 0) < 0 || dup2(term, 1) < 0 || dup2(term, 2) < 0) return fail("dup2");
    if (term > 2) close(term);
    if (send_fd(sock, master)) return fail("hand the terminal to the agent");
    close(master);
    close(sock);
    return 0;
}

/* A regular file of the task's root (we are chrooted there: its symlinks stay inside), at
 * most 4 MiB; "" when absent or not a regular file (a FIFO must not hang us). */
static char *slurp(const char *path) {
    char *buf = calloc(1, 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    struct stat st;
    if (fd < 0) return buf;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= (4 << 20)) {
        char *more = realloc(buf, (size_t)st.st_size + 1);
        ssize_t n = more ? read(fd, more, (size_t)st.st_size) : -1;
        if (more) buf = more;
        buf[n > 0 ? n : 0] = '\0';
    }
    close(fd);
    return buf;
}

/* Field i (0-based) of a ':'-separated line, copied into out; 0 if the line has fewer
 * (the search stops at the line's end). */
static int field(const char *line, int i, char *out, size_t n) {
    for (; i > 0; i--) {
        line += strcspn(line, ":\n");
        if (*line != ':') return 0;
        line++;
    }
    size_t len = strcspn(line, ":\n");
    if (len >= n) len = n - 1;
    memcpy(out, line, len);
    out[len] = '\0';
    return 1;
}

/* A decimal id of at most 2^31-1 (Docker's limit: larger ones wrap in the kernel's view). */
static int id_of(const char *s, unsigned long *out) {
    char *end;
    if (!*s || strspn(s, "0123456789") != strlen(s)) return 0;
    errno = 0;
    *out = strtoul(s, &end, 10);
    return !errno && *out <= 0x7fffffffUL;
}

/* The line of `table` whose field `key` equals `value`, or NULL. */
static const char *row(const char *table, int key, const char *value) {
    for (const char *line = table; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        char f[256];
        if (*line != '#' && field(line, key, f, sizeof f) && strcmp(f, value) == 0) return line;
    }
    return NULL;
}

/* --user SPEC (user, uid, user:group, uid:gid), resolved as Docker does in the task's own
 * /etc/passwd and /etc/group: a numeric uid need not exist (gid 0 then); supplementary
 * groups are the primary one plus /etc/group's memberships of the named user. */
static int resolve_user(const char *spec, uid_t *uid, gid_t *gid, gid_t *groups, size_t *ngroups) {
    char name[256], grp[256] = "";
    const char *colon = strchr(spec, ':');
    size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
    if (len == 0 || len >= sizeof name || (colon && strlen(colon + 1) >= sizeof grp)) goto bad;
    memcpy(name, spec, len);
    name[len] = '\0';
    if (colon) strcpy(grp, colon + 1);
    char *passwd = slurp("/etc/passwd"), *group = slurp("/etc/group");
    unsigned long v;
    const char *entry = id_of(name, &v) ? row(passwd, 2, name) : row(passwd, 0, name);
    char f[256];
    if (id_of(name, &v)) {
        *uid = (uid_t)v;
    } else if (!entry || !field(entry, 2, f, sizeof f) || !id_of(f, &v)) {
        fprintf(stderr, "shoal-execdrop: no user %s in the task's /etc/passwd\n", name);
        return 0;
    } else {
        *uid = (uid_t)v;
    }
    *gid = entry && field(entry, 3, f, sizeof f) && id_of(f, &v) ? (gid_t)v : 0;
    if (*grp) {
        const char *g = id_of(grp, &v) ? NULL : row(group, 0, grp);
        if (!id_of(grp, &v) && (!g || !field(g, 2, f, sizeof f) || !id_of(f, &v))) {
            fprintf(stderr, "shoal-execdrop: no group %s in the task's /etc/group\n", grp);
            return 0;
        }
        *gid = (gid_t)v;
    }
    *ngroups = 0;
    groups[(*ngroups)++] = *gid;
    char user[256];
    if (entry && !*grp && field(entry, 0, user, sizeof user)) {
        for (const char *line = group; line && *line && *ngroups < 256;
             line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
            char members[4096], id[64];
            if (*line == '#' || !field(line, 3, members, sizeof members) ||
                !field(line, 2, id, sizeof id) || !id_of(id, &v)) continue;
            int member = 0;
            for (char *m = strtok(members, ","); m && !member; m = strtok(NULL, ","))
                member = strcmp(m, user) == 0;
            int known = 0;
            for (size_t j = 0; j < *ngroups; j++) known |= groups[j] == (gid_t)v;
            if (member && !known && *ngroups < 256) groups[(*ngroups)++] = (gid_t)v;
        }
    }
    free(passwd);
    free(group);
    return 1;
bad:
    fprintf(stderr, "shoal-execdrop: bad user %s: expected user, uid, user:group or uid:gid\n",
            spec);
    return 0;
}

/* --env-fd FD: the command's environment, NUL-separated KEY=VALUE entries (the agent's
 * memfd), replacing ours — the host stages before us ran with a fixed minimal one. */
static int take_env(int fd) {
    static char buf[1 << 20];
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf && (n = pread(fd, buf + len, sizeof buf - len, (off_t)len)) > 0)
        len += (size_t)n;
    close(fd);
    if (len >= sizeof buf) {
        fprintf(stderr, "shoal-execdrop: the environment is larger than 1 MiB\n");
        return 1;
    }
    buf[len] = '\0';
    static char *env[4097];
    size_t k = 0;
    for (size_t i = 0; i < len; i += strlen(buf + i) + 1) {
        if (!strchr(buf + i, '=')) continue;
        if (k == 4096) {
            fprintf(stderr, "shoal-execdrop: more than 4096 environment variables\n");
            return 1;
        }
        env[k++] = buf + i;
    }
    env[k] = NULL;
    environ = env;
    return 0;
}

/* -d: the pipe whose end tells the agent the exec happened (see above); its write end, or
 * -1 after a failure (said on stderr, still ours). */
static int detach_pipe(int sock, int console) {
    int null = console ? -1 : open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (!console && null < 0) { /* (before the pipe: the agent sees no start) */
        fail("/dev/null");
        return -1;
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC)) {
        fail("pipe");
        return -1;
    }
    if (send_fd(sock, p[0])) {
        fail("hand the start pipe to the agent");
        return -1;
    }
    close(p[0]);
    close(sock);
    if (null >= 0) {
        if (dup2(null, 1) < 0 || dup2(null, 2) < 0) { /* (said on the pipe: no start) */
            const char msg[] = "shoal-execdrop: cannot put /dev/null on stdout\n";
            if (write(p[1], msg, sizeof msg - 1) < 0) return -1;
            return -1;
        }
        close(null);
    }
    return p[1];
}

int main(int argc, char **argv) {
    /* not dumpable until the exec: a task's process cannot open our /proc fds or ptrace us
     * while we still hold the agent's capabilities (the exec makes the command dumpable) */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int sock = -1, envfd = -1, detach = -1, filterfd = -1;
    const char *user = NULL, *workdir = NULL;
    while (argc > 2 && strncmp(argv[1], "--", 2) == 0) {
        if (strcmp(argv[1], "--console") == 0) sock = (int)strtol(argv[2], NULL, 10);
        else if (strcmp(argv[1], "--env-fd") == 0) envfd = (int)strtol(argv[2], NULL, 10);
        else if (strcmp(argv[1], "--detach") == 0) detach = (int)strtol(argv[2], NULL, 10);
        else if (strcmp(argv[1], "--user") == 0) user = argv[2];
        else if (strcmp(argv[1], "--workdir") == 0) workdir = argv[2];
        else if (strcmp(argv[1], "--seccomp-fd") == 0) filterfd = (int)strtol(argv[2], NULL, 10);
        else break;
        argc -= 2;
        argv += 2;
    }
    if (argc < 6) {
        fprintf(stderr, "usage: shoal-execdrop [--console FD] [--env-fd FD] [--user SPEC] "
                        "[--workdir DIR] [--detach SOCK] [--seccomp-fd FD] UID GID GROUPS "
                        "CAPMASK PROG [ARGS...]\n");
        return 125;
    }
    uid_t uid = (uid_t)strtoul(argv[1], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[2], NULL, 10);
    gid_t groups[256]; /* (as many as the launcher gives a task) */
    size_t ngroups = 0;
    for (char *p = argv[3]; *p && ngroups < 256;) {
        groups[ngroups++] = (gid_t)strtoul(p, &p, 10);
        if (*p == ',') p++;
        else break;
    }
    if (user && !resolve_user(user, &uid, &gid, groups, &ngroups)) return 125;
    if (envfd >= 0 && take_env(envfd)) return 125;
    static char filter[(BPF_MAXINSNS + 1) * sizeof(struct sock_filter)];
    size_t filter_len = 0;
    if (filterfd >= 0) {
        ssize_t n;
        while (filter_len < sizeof filter &&
               (n = read(filterfd, filter + filter_len, sizeof filter - filter_len)) != 0) {
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return fail("reading the seccomp filter");
            filter_len += (size_t)n;
        }
        close(filterfd);
    }
    /* While root with the agent's capabilities. Best effort: a limit this process may not
     * take (above its own hard one, without CAP_SYS_RESOURCE; a "task" in the host's pid
     * namespace, whose pid 1 is the host's init) leaves the agent's, as before. */
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit lim;
        if (prlimit(1, (__rlimit_resource_t)r, NULL, &lim) == 0)
            (void)setrlimit((__rlimit_resource_t)r, &lim);
    }
    if (sock >= 0 && console(sock, uid)) return 125;
    uint64_t keep = strtoull(argv[4], NULL, 16);
    for (int c = 0; c < 64; c++) {
        if (keep & (1ULL << c)) continue;
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) && errno == EINVAL) break;
    }
    if (setgroups(ngroups, groups)) return fail("setgroups");
    if (setresgid(gid, gid, gid)) return fail("setgid");
    if (setresuid(uid, uid, uid)) return fail("setuid");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (uid == 0) {
        data[0].effective = data[0].permitted = (uint32_t)keep;
        data[1].effective = data[1].permitted = (uint32_t)(keep >> 32);
    }
    if (syscall(SYS_capset, &hdr, data)) return fail("capset");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return fail("no_new_privs");
    if (workdir && chdir(workdir)) {  /* (as the task's user, as runc) */
        fprintf(stderr, "shoal-execdrop: workdir %s: %s\n", workdir, strerror(errno));
        return 126;
    }
    int started = detach >= 0 ? detach_pipe(detach, sock >= 0) : -1;
    if (detach >= 0 && started < 0) return 125;
    /* nothing of ours reaches the command: the helper itself (an fd nsenter executed), the
     * agent's pipes, the console socket — only 0, 1 and 2 */
    if (syscall(SYS_close_range, 3, ~0U, 4 /* CLOSE_RANGE_CLOEXEC */)) { /* (before 5.11) */
        long max = sysconf(_SC_OPEN_MAX);
        for (long fd = 3; fd < (max > 0 && max < (1L << 20) ? max : (1L << 20)); fd++)
            fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    }
    if (filterfd >= 0 && install_filter(filter, filter_len)) return fail("seccomp filter");
    execvp(argv[5], argv + 5);
    int err = errno;
    char msg[512];
    int len = snprintf(msg, sizeof msg, "shoal-execdrop: %s: %s\n", argv[5], strerror(err));
    size_t n = len < 0 ? 0 : (size_t)len < sizeof msg ? (size_t)len : sizeof msg - 1;
    if (started < 0) fputs(msg, stderr);
    else if (write(started, msg, n) < 0) return 125;
    return err == ENOENT ? 127 : 126;
}
