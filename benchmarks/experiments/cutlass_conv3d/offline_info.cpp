// Prints the compiled configurations' launch constants; links against conv3d_sm90.o, needs no GPU.
#include <cstdio>

#include "conv3d_sm90.h"

int main() {
  for (int i = 0; i < cutlass_conv3d::num_configs(); ++i)
    std::printf("%d %s: %s\n", i, cutlass_conv3d::config_name(i), cutlass_conv3d::describe(i).c_str());
  return 0;
}
