/*
 * The pod sandbox's init: the process that holds a pod's namespaces while
 * its containers come and go (as Kubernetes' pause). It exits 0 on SIGINT
 * or SIGTERM, reaps the zombies a shared PID namespace hands it, and
 * otherwise sleeps.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void sigdown(int signo) {
  (void)signo;
  _exit(0);
}

static void sigreap(int signo) {
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0)
    ;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("pause (cocoon, offline)");
    return 0;
  }
  if (getpid() != 1)
    fprintf(stderr, "pause: warning: not PID 1\n");
  struct sigaction down = {.sa_handler = sigdown};
  struct sigaction reap = {.sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0 ||
      sigaction(SIGCHLD, &reap, NULL) < 0) {
    perror("pause: sigaction");
    return 1;
  }
  for (;;)
    pause();
}
