# Included after every project() call (CMAKE_PROJECT_INCLUDE). llama-cpp-python's CMakeLists FORCEs
# LLAMA_BUILD_COMMON=ON; the Python bindings never load libllama-common, so switch it back off
# inside llama.cpp's own project() scope to skip ~50 heavy C++ objects (json, jinja, chat parsers, httplib).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
