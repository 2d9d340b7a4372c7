/* filter.h — shared by launcher.c and execdrop.c (each compiled alone, from one .c file; the
 * build's digest covers this header too: runtime/launcher.py HEADERS).
 *
 * install_filter: install the seccomp filter `prog` (`len` bytes of `struct sock_filter`, as
 * runtime/seccomp.py's compile_filter exports them from libseccomp) on this thread, which has
 * set no_new_privs. Called as the last step before the exec: every call after it (the exec
 * itself) must be one the profile allows. 0, or -1 with errno set (EINVAL: not a whole
 * number of instructions, or more than the kernel takes). */
#ifndef SHOAL_FILTER_H
#define SHOAL_FILTER_H

#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>

static int install_filter(const char *prog, size_t len) {
    if (len == 0 || len % sizeof(struct sock_filter) ||
        len / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        errno = EINVAL;
        return -1;
    }
    struct sock_fprog fprog = {(unsigned short)(len / sizeof(struct sock_filter)),
                               (struct sock_filter *)(void *)prog};
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0);
}

#endif
