/* sendfd.h — shared by launcher.c and execdrop.c (each compiled alone, from one .c file; the
 * build's digest covers this header too: runtime/launcher.py HEADERS).
 *
 * send_fd: hand the open file `fd` to the peer of the unix socket `sock` (SCM_RIGHTS, with one
 * byte 'T' as the message: a terminal's master, for the shim or the agent). 0 when sent, -1
 * with errno set otherwise. */
#ifndef SHOAL_SENDFD_H
#define SHOAL_SENDFD_H

#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

static int send_fd(int sock, int fd) {
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
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

#endif
