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
 * Usage: shoal-execdrop [--console FD] UID GID GROUPS CAPMASK PROG [ARGS...]
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
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

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
    char byte = 'T';
    struct iovec iov = {&byte, 1};
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &master, sizeof(int));
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != 1) return fail("hand the terminal to the agent");
    close(master);
    close(sock);
    return 0;
}

int main(int argc, char **argv) {
    int sock = -1;
    if (argc > 2 && strcmp(argv[1], "--console") == 0) {
        sock = (int)strtol(argv[2], NULL, 10);
        argc -= 2;
        argv += 2;
    }
    if (argc < 6) {
        fprintf(stderr, "usage: shoal-execdrop [--console FD] UID GID GROUPS CAPMASK PROG "
                        "[ARGS...]\n");
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
    execvp(argv[5], argv + 5);
    fprintf(stderr, "shoal-execdrop: %s: %s\n", argv[5], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
